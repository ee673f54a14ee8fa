"""What the ThinkMerge answer phase costs: a merged answer over k traces vs a single-trace answer of
the same length, on one server, measured side by side.

Every context (a prompt plus its own "trace", distinct per member) is prefilled once before timing,
so, as in ThinkMerge, the answer phase reads it from the radix cache and the measurement is decode.

(a) latency at batch 1: one single-trace answer vs one merge group of k members, N answer tokens,
    paired rounds with alternating order; median latency and the merged/single ratio per k.
(b) throughput under concurrency: C answers in flight at once, single-trace vs merge@k; answers'
    tokens/s (a merged answer counts once, as the user receives it once) and the ratio.

Without --url it starts a CPU server on the bundled tiny reasoner (or --model-path).

    python scripts/bench_answer_phase.py
    python scripts/bench_answer_phase.py --url http://127.0.0.1:30000 --k 2,4,8 --tokens 256
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from _common import contexts, parser, TINY_REASONER



def answer(url: str, members: list[list[int]], tokens: int) -> float:
    """One answer over `members` (one context: a single-trace answer; k: a merge group); seconds."""
    params = {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}
    if len(members) > 1:
        params = {**params, "custom_params": {"sgl_merge": {"group": uuid.uuid4().hex, "size": len(members)}}}
    t0 = time.perf_counter()
    r = requests.post(f"{url}/generate", json={"input_ids": members, "sampling_params": [params] * len(members)},
                      timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def warm(url: str, ctx: list[list[int]]) -> None:
    """Prefill every context once, so the timed answers read them from the radix cache."""
    r = requests.post(f"{url}/generate", json={"input_ids": ctx, "sampling_params": {"max_new_tokens": 1}},
                      timeout=600)
    r.raise_for_status()


def latency(url: str, ks: list[int], tokens: int, ctx_len: int, rounds: int) -> None:
    print(f"\n(a) latency at batch 1, {tokens} answer tokens, contexts of {ctx_len} tokens, {rounds} paired rounds")
    for k in ks:
        ctx = contexts(k, ctx_len)
        warm(url, ctx)
        single, merged = [], []
        for r in range(rounds):
            for m in ((True, False) if r % 2 == 0 else (False, True)):
                (merged if m else single).append(answer(url, ctx if m else ctx[:1], tokens))
        ratios = [m / s for m, s in zip(merged, single)]
        print(f"    k={k}: single {statistics.median(single) * 1e3:8.1f} ms   merge@{k} "
              f"{statistics.median(merged) * 1e3:8.1f} ms   ratio {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})", flush=True)


def throughput(url: str, ks: list[int], tokens: int, ctx_len: int, concurrency: int, rounds: int) -> None:
    print(f"\n(b) throughput, {concurrency} answers in flight, {tokens} tokens each, {rounds} paired rounds")
    for k in ks:
        ctx = contexts(concurrency * k, ctx_len)
        warm(url, ctx)
        groups = [ctx[i * k:(i + 1) * k] for i in range(concurrency)]

        def run(merged: bool) -> float:
            work = groups if merged else [g[:1] for g in groups]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda members: answer(url, members, tokens), work))
            return concurrency * tokens / (time.perf_counter() - t0)

        single, merged = [], []
        for r in range(rounds):
            for m in ((True, False) if r % 2 == 0 else (False, True)):
                (merged if m else single).append(run(m))
        ratios = [m / s for m, s in zip(merged, single)]
        print(f"    k={k}: single {statistics.median(single):8.1f} answer tok/s   merge@{k} "
              f"{statistics.median(merged):8.1f} answer tok/s   ratio {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})", flush=True)


def main() -> None:
    p = parser(__doc__, TINY_REASONER, rounds=5)
    p.add_argument("--k", default="2,4,8")
    p.add_argument("--tokens", type=int, default=64, help="answer tokens")
    p.add_argument("--context-len", type=int, default=96, help="prompt + trace tokens per member")
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    from sgl_merge.server import running
    from sgl_merge.tiny_reasoner import MODEL_DIR

    ks = [int(k) for k in args.k.split(",")]
    with running(args.url, args.model_path or MODEL_DIR, ["--dtype", "float32"]) as url:
        latency(url, ks, args.tokens, args.context_len, args.rounds)
        throughput(url, ks, args.tokens, args.context_len, args.concurrency, args.rounds)


if __name__ == "__main__":
    main()

"""Runtime merging vs naive client-side merging, on the same server, measured side by side.

Naive: what a client can do without sgl-merge. At every answer token it sends one /generate per
branch (max_new_tokens 1, top-T logprobs), averages the branches' log-probabilities over the union of
their top-T tokens (a token missing from a branch's top T gets that branch's smallest top-T
logprob), picks the argmax and appends it to every branch: k requests and a round trip per token.
Runtime: one merge group, `mode="logprobs"` (the same average, over the whole vocabulary, on the
device), greedy. Both decode N tokens over the same k contexts; the script prints tokens/s of each,
the runtime/naive ratio (median over paired rounds) and how many tokens the two agree on.

Without --url it starts a CPU server on the bundled tiny reasoner (or --model-path).

    python scripts/bench_naive_merge.py
    python scripts/bench_naive_merge.py --url http://127.0.0.1:30000 --k 4 --tokens 64
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from _common import contexts, parser, TINY_REASONER



def runtime(url: str, ctx: list[list[int]], tokens: int) -> tuple[list[int], float]:
    group = {"group": uuid.uuid4().hex, "size": len(ctx), "mode": "logprobs"}
    params = {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True, "custom_params": {"sgl_merge": group}}
    t0 = time.perf_counter()
    r = requests.post(f"{url}/generate", json={"input_ids": ctx, "sampling_params": [params] * len(ctx)}, timeout=600)
    r.raise_for_status()
    return r.json()[0]["output_ids"], time.perf_counter() - t0


def naive(url: str, ctx: list[list[int]], tokens: int, top: int, pool: ThreadPoolExecutor) -> tuple[list[int], float]:
    session = requests.Session()

    def step(ids: list[int]) -> dict[int, float]:
        r = session.post(f"{url}/generate", timeout=600, json={
            "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": top, "logprob_start_len": -1})
        r.raise_for_status()
        return {tok: lp for lp, tok, *_ in r.json()["meta_info"]["output_top_logprobs"][0]}

    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        tops = list(pool.map(step, [c + out for c in ctx]))
        floors = [min(d.values()) for d in tops]
        union = set().union(*tops)
        mean = {t: sum(d.get(t, f) for d, f in zip(tops, floors)) / len(tops) for t in union}
        out.append(max(mean, key=mean.get))
    return out, time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__, TINY_REASONER, rounds=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--top", type=int, default=20, help="top-T logprobs per branch for the naive client")
    p.add_argument("--context-len", type=int, default=96)
    args = p.parse_args()
    from sgl_merge.server import running
    from sgl_merge.tiny_reasoner import MODEL_DIR

    ctx = contexts(args.k, args.context_len)
    with running(args.url, args.model_path or MODEL_DIR, ["--dtype", "float32"]) as url, \
            ThreadPoolExecutor(args.k) as pool:
        runtime(url, ctx, 4)  # warm up: prefill the contexts, compile nothing twice
        naive(url, ctx, 2, args.top, pool)
        ratios, rt_tps, nv_tps, agree = [], [], [], []
        for r in range(args.rounds):
            order = ("runtime", "naive") if r % 2 == 0 else ("naive", "runtime")
            res = {m: runtime(url, ctx, args.tokens) if m == "runtime" else naive(url, ctx, args.tokens, args.top, pool)
                   for m in order}
            rt_tps.append(args.tokens / res["runtime"][1])
            nv_tps.append(args.tokens / res["naive"][1])
            ratios.append(rt_tps[-1] / nv_tps[-1])
            agree.append(sum(a == b for a, b in zip(res["runtime"][0], res["naive"][0])) / args.tokens)
            print(f"  round {r + 1}/{args.rounds}: runtime {rt_tps[-1]:8.1f} tok/s   naive {nv_tps[-1]:6.1f} tok/s   "
                  f"ratio {ratios[-1]:.1f}   same tokens {agree[-1]:.0%}", flush=True)
    print(f"\nk={args.k}, {args.tokens} tokens, contexts of {args.context_len}, naive top-{args.top}, "
          f"{args.rounds} paired rounds")
    print(f"    runtime merging       median {statistics.median(rt_tps):8.1f} tok/s")
    print(f"    naive client merging  median {statistics.median(nv_tps):8.1f} tok/s")
    print(f"    runtime/naive ratio: median {statistics.median(ratios):.1f} (range {min(ratios):.1f}-{max(ratios):.1f});"
          f" tokens agreeing {statistics.median(agree):.0%}")


if __name__ == "__main__":
    main()

"""Benchmark merge groups: (a) the merge kernel on a GPU, (b) merged vs unmerged decoding on a server.

(a) runs `bench_merge_kernel.py` (Triton kernel GB/s vs the device's peak and vs the torch path)
    when CUDA is available, and says it is skipped otherwise.
(b) decodes G groups of K members merged, and the same G*K contexts unmerged in the same G batch
    requests of K, on one server, alternating the two in paired rounds; prints tokens/s of each
    and the merged/unmerged ratio (median and range over the rounds). Without --url it starts a
    CPU server on a small random model (or --model-path).

    python scripts/bench_merge.py                      # both parts, local CPU server
    python scripts/bench_merge.py --url http://127.0.0.1:30000 --skip-kernel
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from _common import contexts, parser, SMALL_RANDOM_MODEL

PROMPT_WORDS = "think in parallel answer as one every branch keeps its own context while merging".split()


def decode_round(url: str, ctx: list[list[int]], k: int, tokens: int, merged: bool) -> float:
    """Send the contexts k at a time, one /generate each, all at once; when merged, each /generate
    is one merge group. Same request shapes either way, so the ratio measures the merge alone.
    Return generated member tokens per second."""
    base = {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}
    batches = []
    for g in range(0, len(ctx), k):
        members = ctx[g : g + k]
        merge = {"custom_params": {"sgl_merge": {"group": uuid.uuid4().hex, "size": k}}} if merged else {}
        batches.append({"input_ids": members, "sampling_params": [{**base, **merge} for _ in members]})

    def send(body):
        r = requests.post(f"{url}/generate", json=body, timeout=600)
        r.raise_for_status()
        out = r.json()
        return sum(len(o["output_ids"]) for o in (out if isinstance(out, list) else [out]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(batches)) as pool:
        produced = sum(pool.map(send, batches))
    return produced / (time.perf_counter() - t0)


def bench_server(url: str, groups: int, k: int, tokens: int, prompt_len: int, rounds: int) -> None:
    ctx = contexts(groups * k, prompt_len)
    decode_round(url, ctx, k, 8, merged=True)  # warm up both paths
    decode_round(url, ctx, k, 8, merged=False)
    ratios, merged_tps, plain_tps = [], [], []
    for r in range(rounds):
        # Alternate which goes first so drift on a noisy machine hits both equally.
        order = (True, False) if r % 2 == 0 else (False, True)
        tps = {m: decode_round(url, ctx, k, tokens, m) for m in order}
        merged_tps.append(tps[True])
        plain_tps.append(tps[False])
        ratios.append(tps[True] / tps[False])
        print(f"  round {r + 1}/{rounds}: merged {tps[True]:8.1f} tok/s   unmerged {tps[False]:8.1f} tok/s   "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"\n(b) decode throughput, {groups} groups x K={k} vs the same {groups} requests of {k} contexts unmerged, "
          f"{tokens} tokens, {rounds} paired rounds")
    print(f"    merged   median {statistics.median(merged_tps):8.1f} tok/s")
    print(f"    unmerged median {statistics.median(plain_tps):8.1f} tok/s")
    print(f"    merged/unmerged ratio: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def bench_kernel(extra: list[str]) -> None:
    import torch

    if not torch.cuda.is_available():
        print("(a) kernel benchmark: skipped, it needs a CUDA GPU (run scripts/bench_merge_kernel.py there)")
        return
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_merge_kernel.py")), *extra], check=True)


def main() -> None:
    p = parser(__doc__, SMALL_RANDOM_MODEL, rounds=5)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--skip-kernel", action="store_true")
    p.add_argument("--skip-server", action="store_true")
    args, kernel_args = p.parse_known_args()
    if not args.skip_kernel:
        bench_kernel(kernel_args)
    if args.skip_server:
        return
    from sgl_merge.server import running

    with running(args.url, args.model_path) as url:
        bench_server(url, args.groups, args.k, args.tokens, args.prompt_len, args.rounds)


if __name__ == "__main__":
    main()

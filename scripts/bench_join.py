"""Benchmark the KV join: a continuation over P kept paths, against the same tokens re-prefilled.

For each round, P paths of L tokens after a shared prompt are generated and kept
(`sgl_merge_keep`); then, side by side in alternating order, (a) a join of them
(`sgl_merge_join`: only the continuation is prefilled) and (b) a plain request of the same joined
tokens (the radix cache holds at most the prompt and path 1 as a sequential computation, so it
prefills the other P-1 paths again). Prints the time to the first token of each (a request with
`max_new_tokens` 1), the prefilled tokens of each (prompt_tokens - cached_tokens), and the
join / re-prefill time ratio (median and range over the rounds). Without --url it starts a CPU
server on a small random model (or --model-path). The plain requests' tokens are shifted by one
id each round so that no round reuses an earlier round's cache.

    python scripts/bench_join.py                        # local CPU server
    python scripts/bench_join.py --url http://127.0.0.1:30000 --paths 8 --path-len 2048
"""

from __future__ import annotations

import statistics
import time
import uuid

import requests

from _common import parser, SMALL_RANDOM_MODEL


def post(url: str, body: dict) -> dict:
    r = requests.post(f"{url}/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def first_token(url: str, body: dict) -> tuple[float, int]:
    """Seconds to a one-token answer, and the tokens the server prefilled for it."""
    t0 = time.perf_counter()
    meta = post(url, body)["meta_info"]
    return time.perf_counter() - t0, meta["prompt_tokens"] - meta.get("cached_tokens", 0)


def bench_round(url: str, r: int, paths: int, path_len: int, prompt_len: int) -> tuple[float, float, int, int]:
    prompt = [(r + 5 * j) % 200 + 32 for j in range(prompt_len)]
    rids, sources = [], []
    for i in range(paths):  # the paths, each a sequential computation from the prompt, kept
        rid = f"bench-{uuid.uuid4().hex}"
        ids = prompt + [(r + 11 * i + 3 * j) % 200 + 32 for j in range(path_len)]
        post(url, {"input_ids": ids, "rid": rid,
                   "sampling_params": {"max_new_tokens": 0, "custom_params": {"sgl_merge_keep": True}}})
        rids.append(rid)
        sources.append(ids)
    continuation = [40, 41, 42, 43]
    joined = prompt + [t for s in sources for t in s[prompt_len:]] + continuation
    one = {"max_new_tokens": 1, "temperature": 0}
    join_body = {"input_ids": continuation, "sampling_params": {**one, "custom_params": {"sgl_merge_join": {
        "sources": rids, "prompt_len": prompt_len, "positions": "sequential"}}}}
    plain_body = {"input_ids": joined, "sampling_params": one}
    runs = [("join", join_body), ("plain", plain_body)] if r % 2 == 0 else [("plain", plain_body), ("join", join_body)]
    out = {name: first_token(url, body) for name, body in runs}
    return out["join"][0], out["plain"][0], out["join"][1], out["plain"][1]


def main() -> None:
    p = parser(__doc__, SMALL_RANDOM_MODEL, rounds=5)
    p.add_argument("--paths", type=int, default=4)
    p.add_argument("--path-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=64)
    args = p.parse_args()
    from sgl_merge.server import running

    with running(args.url, args.model_path) as url:
        bench_round(url, 10_000, args.paths, 8, 8)  # warm up both paths
        ratios, joins, plains = [], [], []
        for r in range(args.rounds):
            join_s, plain_s, join_n, plain_n = bench_round(url, r, args.paths, args.path_len, args.prompt_len)
            joins.append(join_s)
            plains.append(plain_s)
            ratios.append(join_s / plain_s)
            print(f"  round {r + 1}/{args.rounds}: join {join_s * 1e3:8.1f} ms ({join_n} tokens prefilled)   "
                  f"re-prefill {plain_s * 1e3:8.1f} ms ({plain_n} tokens prefilled)   ratio {ratios[-1]:.3f}", flush=True)
        print(f"\nKV join vs re-prefill: {args.paths} paths of {args.path_len} tokens after a {args.prompt_len}-token "
              f"prompt, time to the first token, {args.rounds} paired rounds")
        print(f"    join       median {statistics.median(joins) * 1e3:8.1f} ms")
        print(f"    re-prefill median {statistics.median(plains) * 1e3:8.1f} ms")
        print(f"    join/re-prefill ratio: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()

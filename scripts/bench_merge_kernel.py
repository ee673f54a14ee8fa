"""Benchmark the in-place merge of merge groups' logits rows: the Triton kernels against the
vectorised torch path, on a CUDA device.

Every one of the N rows is grouped (N / K groups of K shuffled rows). The merge is memory-bound,
so the figure of merit is bandwidth: bytes = every grouped row read once and written once, plus
one more read for modes that need each member's log-sum-exp (logprobs, probs, entropy). L2 is flushed
before each timed call so that small batches are not timed out of cache.

    python scripts/bench_merge_kernel.py
    python scripts/bench_merge_kernel.py --rows 64 --ks 4 --dtypes bf16 --modes probs
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: import this checkout's sgl_merge.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_merge.kernels.merge_logits import (  # noqa: E402
    MODES,
    merge_logits_reference,
    merge_logits_torch,
    merge_logits_triton,
    pack_groups,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Peak HBM bandwidth (GB/s) by device name; checked in order, the first substring found wins.
PEAK_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0)]
L2_FLUSH_BYTES = 256 * 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 64, 256], help="rows N in the batch, all grouped")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="members per group K")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--iters", type=int, default=100, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--peak-gbs", type=float, help="device peak bandwidth in GB/s (default: by device name)")
    return p.parse_args()


def peak_gbs(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def merge_bytes(n_rows: int, vocab: int, dtype: torch.dtype, mode: str) -> int:
    passes = 2 if mode == "logits" else 3  # read + write, + the log-sum-exp read
    return passes * n_rows * vocab * dtype.itemsize


def median_ms(fn, iters: int, warmup: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def max_abs_err(merge, logits: torch.Tensor, tables, expected: torch.Tensor) -> float:
    got = logits.clone()
    merge(got, *tables)
    return (got.float() - expected.float()).abs().max().item()


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("The merge kernel benchmark needs a CUDA GPU; none is available here. Nothing timed.")
        return 0
    name = torch.cuda.get_device_name()
    peak = peak_gbs(name, args.peak_gbs)
    print(f"device: {name}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}")
    print(f"V={args.vocab}, median of {args.iters} calls after {args.warmup} warm-up, L2 flushed before each\n")

    def pct(gbs: float) -> str:
        return f"{100 * gbs / peak:5.1f}%" if peak else "  n/a"

    header = (
        f"{'dtype':5} {'mode':8} {'N':>4} {'K':>2} | {'err triton':>10} {'err torch':>10} | "
        f"{'triton us':>9} {'GB/s':>6} {'peak':>6} | {'torch us':>9} {'GB/s':>6} {'peak':>6} | {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rng = random.Random(0)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for mode in args.modes:
            for n_rows in args.rows:
                for k in args.ks:
                    rows = rng.sample(range(n_rows), n_rows)
                    weights = [rng.uniform(0.5, 2.0) for _ in rows]
                    groups = [(rows[i : i + k], weights[i : i + k], mode) for i in range(0, n_rows - k + 1, k)]
                    tables = pack_groups(groups, device="cuda")
                    logits = torch.randn(n_rows, args.vocab, device="cuda").to(dtype)
                    expected = logits.clone()
                    merge_logits_reference(expected, *tables)
                    err_triton = max_abs_err(merge_logits_triton, logits, tables, expected)
                    err_torch = max_abs_err(merge_logits_torch, logits, tables, expected)

                    nbytes = merge_bytes(len(groups) * k, args.vocab, dtype, mode)
                    used = frozenset({MODES[mode]})  # as the runtime passes them: mode 0 skips the log-sum-exp pass
                    ms_triton = median_ms(lambda: merge_logits_triton(logits, *tables, modes=used), args.iters,
                                          args.warmup, flush)
                    ms_torch = median_ms(lambda: merge_logits_torch(logits, *tables, modes=used), args.iters,
                                         args.warmup, flush)
                    gbs_triton, gbs_torch = nbytes / ms_triton / 1e6, nbytes / ms_torch / 1e6
                    print(
                        f"{dtype_name:5} {mode:8} {n_rows:>4} {k:>2} | {err_triton:>10.2e} {err_torch:>10.2e} | "
                        f"{1e3 * ms_triton:>9.1f} {gbs_triton:>6.0f} {pct(gbs_triton)} | "
                        f"{1e3 * ms_torch:>9.1f} {gbs_torch:>6.0f} {pct(gbs_torch)} | {ms_torch / ms_triton:>6.2f}x"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

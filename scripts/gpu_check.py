"""The GPU checks, in one command, for a machine with torch and triton (SGLang not needed).

    python scripts/gpu_check.py            # everything; a few minutes on an H100
    python scripts/gpu_check.py --quick    # smaller benchmark

1. kernels: the Triton kernels against the plain torch reference, natively (every mode, K = 1-16,
   fp32 and bf16, V = 151936), and run to run determinism;
2. compile: the first call at a new table width (a compile) against warm calls, and `warm_up`, which
   the plugin runs at server start;
3. bench: `scripts/bench_merge_kernel.py` (GB/s against the device's peak, vs the torch path);
4. segments: ParaThinker's segment-id computation (decode and extend) captured in a
   `torch.cuda.CUDAGraph` and replayed with new inputs (padded rows included) against eager; a graph
   reading the persistent buffer sees each step's ids, one reading a re-assigned attribute does not;
5. sync: the sampling step (merge, sample, commit, agreement counters), a batch change's
   `build_map` / `pack_groups` and the segment-id step under `torch.cuda.set_sync_debug_mode("error")`.

Without CUDA it runs what a CPU can (the segment ids against a plain Python reference, the sampling
step under a recorder of host-synchronising tensor calls) and says which checks it skipped.
Exit status 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sgl_merge, installed or not

from sgl_merge.contract.merge import MemberSpec  # noqa: E402
from sgl_merge.kernels import merge_logits as K  # noqa: E402
from sgl_merge.models.parathinker import SUMMARY, SegmentIds  # noqa: E402
from sgl_merge.runtime import sampling  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []  # (check, PASS / FAIL / SKIP, detail)


def check(name: str, needs_cuda: bool = False):
    def wrap(fn):
        def run(args):
            if needs_cuda and not torch.cuda.is_available():
                RESULTS.append((name, "SKIP", "no CUDA device"))
                print(f"[SKIP] {name}: no CUDA device", flush=True)
                return
            start = time.perf_counter()
            try:
                detail = fn(args) or ""
                RESULTS.append((name, "PASS", detail))
                print(f"[PASS] {name} ({time.perf_counter() - start:.1f} s) {detail}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the other checks
                RESULTS.append((name, "FAIL", f"{type(e).__name__}: {e}"))
                print(f"[FAIL] {name}: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
        return run
    return wrap


# ------------------------------------------------------------------ 1-2. kernels


def _case(seed: int, sizes: list[int], vocab: int, dtype, mode: str, device: str):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes) + 3
    logits = 3 * torch.randn(n, vocab, generator=gen)
    logits[torch.rand(n, vocab, generator=gen) < 0.05] = -float("inf")
    order = torch.randperm(n, generator=gen).tolist()
    groups, start = [], 0
    for size in sizes:
        rows = order[start:start + size]
        start += size
        groups.append((rows, (0.5 + torch.rand(size, generator=gen)).tolist(), mode, 0.7))
    k_max = 1 << (max(sizes) - 1).bit_length()
    return logits.to(dtype).to(device), K.pack_groups(groups, device=device, k_max=k_max)


@check("kernels match the torch reference (all modes, K 1-16, fp32/bf16, V=151936)", needs_cuda=True)
def check_kernels(args):
    worst = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for mode in K.MODES:
            for sizes in ([1], [2, 3], [4, 4, 1], [8], [16, 5]):
                logits, tables = _case(len(sizes), sizes, 151936, dtype, mode, "cuda")
                expected = logits.clone()
                K.merge_logits_reference(expected, *tables)
                got = logits.clone()
                K.merge_logits_triton(got, *tables, modes=K.modes_of([mode]))
                again = logits.clone()
                K.merge_logits_triton(again, *tables, modes=K.modes_of([mode]))
                if not torch.equal(got, again):
                    raise AssertionError(f"{mode} {dtype} K={sizes}: two runs differ (not deterministic)")
                finite = torch.isfinite(expected)
                if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(expected[~finite], got[~finite]):
                    raise AssertionError(f"{mode} {dtype} K={sizes}: masked tokens differ")
                err = (got[finite].float() - expected[finite].float()).abs() / (1 + expected[finite].float().abs())
                worst[(mode, str(dtype))] = max(worst.get((mode, str(dtype)), 0.0), float(err.max()))
                if worst[(mode, str(dtype))] > tol:
                    raise AssertionError(f"{mode} {dtype} K={sizes}: relative error {worst[(mode, str(dtype))]:.2e}")
    return "max rel err " + ", ".join(f"{m}/{d[6:]} {e:.1e}" for (m, d), e in worst.items())


@check("first call (compile) vs warm calls; warm_up at server start", needs_cuda=True)
def check_compile(args):
    vocab = 151936 - 7  # a vocabulary not compiled for yet: a cold first call
    out = []
    for k in (4,):
        logits = torch.randn(k, vocab, device="cuda")
        tables = K.pack_groups([(list(range(k)), [1.0] * k, "logprobs")], device="cuda", k_max=k)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        K.merge_logits_triton(logits, *tables)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(20):
            K.merge_logits_triton(logits, *tables)
        torch.cuda.synchronize()
        warm = (time.perf_counter() - t0) / 20
        out.append(f"K={k}: first {1e3 * first:.0f} ms, warm {1e6 * warm:.0f} us")
    secs = K.warm_up(torch.device("cuda"), 151936 - 5)
    if K.triton_failure is not None:
        raise AssertionError(f"warm_up fell back to torch: {K.triton_failure}")
    out.append(f"warm_up(widths {K.WARM_WIDTHS}, new V) {secs:.1f} s")
    return "; ".join(out)


@check("kernel benchmark (GB/s vs peak, vs torch)", needs_cuda=True)
def check_bench(args):
    extra = ["--rows", "32", "256", "--ks", "4", "8", "--iters", "30"] if args.quick else ["--iters", "50"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_merge_kernel.py"), *extra],
                          capture_output=True, text=True, timeout=420)
    print(proc.stdout, proc.stderr[-2000:], flush=True)
    if proc.returncode:
        raise AssertionError(f"bench_merge_kernel.py exited {proc.returncode}")
    return "table above"


# ------------------------------------------------------------------ 4. segments

OPEN = {10: 1, 11: 2, 12: 3, 20: SUMMARY}  # <think1..3>, <summary>
CLOSE = {13: 1, 14: 2, 15: 3}  # </think1..3>
VOCAB = 32


def _segments(device) -> SegmentIds:
    table = torch.full((VOCAB,), -1, dtype=torch.int64)
    own = torch.full((VOCAB,), -1, dtype=torch.int64)
    for t, s in OPEN.items():
        table[t] = s
    for t, s in CLOSE.items():
        own[t] = s
    return SegmentIds(table.to(device), own.to(device), torch.zeros(64, dtype=torch.int64, device=device),
                      torch.zeros(4096, dtype=torch.int32, device=device), OPEN)


def _reference(tokens: list[int], state) -> tuple[list[int], object]:
    """Plain Python: the segment of each token, and the state after them."""
    out = []
    for t in tokens:
        if state != SUMMARY and t in OPEN:
            state = OPEN[t]
        out.append(0 if state == SUMMARY else CLOSE.get(t, state))
    return out, state


def _mode(decode: bool):
    return SimpleNamespace(is_decode=lambda: decode, is_idle=lambda: False)


def _random_batch(gen, rows: int, max_len: int, decode: bool):
    lens = [1] * rows if decode else torch.randint(1, max_len + 1, (rows,), generator=gen).tolist()
    tokens = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lens]
    pool = torch.randperm(60, generator=gen)[:rows] + 1
    return tokens, pool


def _check_against_reference(segs: SegmentIds, gen, device, steps: int) -> None:
    """Random extends and decodes over random rows, states carried, against `_reference`."""
    states = {r: 0 for r in range(64)}
    for step in range(steps):
        decode = step % 2 == 1
        tokens, pool = _random_batch(gen, 5, 9, decode)
        lens = torch.tensor([len(t) for t in tokens])
        fb = SimpleNamespace(input_ids=torch.tensor(sum(tokens, [])).to(device), req_pool_indices=pool.to(device),
                             forward_mode=_mode(decode), extend_seq_lens=lens.to(device),
                             extend_start_loc=(torch.cumsum(lens, 0) - lens).to(device))
        got = segs.compute(fb.input_ids, fb).tolist()
        want = []
        for row, toks in zip(pool.tolist(), tokens):
            ids, states[row] = _reference(toks, states[row])
            want += ids
        if got != want:
            raise AssertionError(f"step {step}: {got} != {want}")


@check("segment ids against a plain reference (extend and decode, summaries stay 0)")
def check_segments_eager(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_against_reference(_segments(device), torch.Generator().manual_seed(0), device, 200)
    return f"200 random steps on {device}"


@check("segment ids captured in a CUDA graph, replayed with new inputs (padded rows too)", needs_cuda=True)
def check_segments_graph(args):
    gen = torch.Generator().manual_seed(1)
    for decode, padded in ((True, 8), (False, 64)):
        graph_segs, eager_segs = _segments("cuda"), _segments("cuda")
        rows = 5
        static = SimpleNamespace(input_ids=torch.zeros(padded, dtype=torch.int64, device="cuda"),
                                 req_pool_indices=torch.zeros(rows, dtype=torch.int64, device="cuda"),
                                 forward_mode=_mode(decode),
                                 extend_seq_lens=torch.ones(rows, dtype=torch.int64, device="cuda"),
                                 extend_start_loc=torch.arange(rows, dtype=torch.int64, device="cuda"))
        if decode:
            static.input_ids = static.input_ids[:rows]
        out = torch.zeros(static.input_ids.numel(), dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph_segs.compute(static.input_ids, static, update_rows=False)  # warm the allocator
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(graph_segs.compute(static.input_ids, static))
        graph_segs.rows.zero_()
        for step in range(20):
            tokens, pool = _random_batch(gen, rows, (padded - rows) // rows + 1, decode)
            lens = torch.tensor([len(t) for t in tokens])
            flat = sum(tokens, [])
            n = len(flat)
            # As SGLang's runners: copy the live batch into the static buffers; padded rows point
            # at pool row 0 (never handed out) and their tokens are ignored.
            static.input_ids.zero_()
            static.input_ids[:n].copy_(torch.tensor(flat))
            static.req_pool_indices.copy_(pool)
            if not decode:
                last = padded - (n - int(lens[-1]))  # the last request takes the padding
                static.extend_seq_lens.copy_(torch.cat([lens[:-1], torch.tensor([last])]))
                static.extend_start_loc.copy_(torch.cumsum(lens, 0) - lens)
            graph.replay()
            live = SimpleNamespace(input_ids=torch.tensor(flat, device="cuda"), req_pool_indices=pool.cuda(),
                                   forward_mode=_mode(decode), extend_seq_lens=lens.cuda(),
                                   extend_start_loc=(torch.cumsum(lens, 0) - lens).cuda())
            want = eager_segs.compute(live.input_ids, live)
            if not decode:
                # Eager's row states come from each request's real end; the graph's last request ran on
                # into the padding: bring its row to eager's state (SGLang re-inits rows at prefill).
                graph_segs.rows[pool.cuda()] = eager_segs.rows[pool.cuda()]
            if not torch.equal(out[:n], want):
                raise AssertionError(f"{'decode' if decode else 'extend'} step {step}: graph {out[:n].tolist()} "
                                     f"!= eager {want.tolist()}")
            if decode and not torch.equal(graph_segs.rows, eager_segs.rows):
                raise AssertionError(f"decode step {step}: row states differ")
    # The persistent-buffer pattern: a graph that reads a slice of one buffer sees every step's ids
    # written with copy_; one that read an attribute later re-assigned keeps the capture-time tensor.
    table = torch.randn(4, 8, device="cuda")
    holder = SimpleNamespace(ids=torch.zeros(16, dtype=torch.int64, device="cuda"))
    result = torch.zeros(16, 8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result.copy_(table[holder.ids[:16]])
    new = torch.randint(0, 4, (16,), device="cuda")
    holder.ids.copy_(new)
    graph.replay()
    if not torch.equal(result, table[new]):
        raise AssertionError("the graph did not see ids written into its buffer")
    holder.ids = torch.randint(0, 4, (16,), device="cuda")
    graph.replay()
    stale = not torch.equal(result, table[holder.ids])
    return ("decode bs 5 padded to 8, extend 5 requests padded to 64 tokens, 20 replays each; a re-assigned "
            f"attribute {'is stale under replay, as expected' if stale else 'happened to match'}")


# ------------------------------------------------------------------ 5. no host sync


class SyncRecorder(torch.overrides.TorchFunctionMode):
    """Records the tensor calls that make the host wait for the device (on a CPU, where CUDA's sync
    debug mode has nothing to watch)."""

    SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCING or (name == "to" and any(str(a) == "cpu" for a in args[1:])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _merge_batch(device, n_rows=12, vocab=1000, k=4, modes=("logits", "entropy", "probs")):
    reqs = []
    for i in range(n_rows):
        group = i // k if i < k * len(modes) else None
        spec = MemberSpec(group=f"g{group}", size=k, mode=modes[group]) if group is not None else None
        reqs.append(SimpleNamespace(_sgl_merge=spec, finished=lambda: False, output_ids=[1, 2, 3],
                                    customized_info=None))
    return reqs, torch.randn(n_rows, vocab, device=device)


def _step(device, sync_mode: bool):
    """One batch change and three steps of the sampling hook, with a device argmax as SGLang's sampler."""
    reqs, logits = _merge_batch(device)
    info = SimpleNamespace(device=device)

    def original(sampler, logits_output, sampling_info, *args, **kwargs):
        return logits_output.next_token_logits.argmax(dim=-1)

    segs = _segments(device)
    fb = SimpleNamespace(input_ids=torch.randint(0, VOCAB, (5,), device=device),
                         req_pool_indices=torch.arange(1, 6, device=device), forward_mode=_mode(True))
    recorder = SyncRecorder() if not sync_mode else None
    if sync_mode:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        sampling._set(info, reqs)  # a batch change: pack_groups, slots, leader map (host tensors, then copies)
        with recorder or nullcontext():  # on a CPU every tensor is a host tensor: watch the steps alone
            for _ in range(3):
                out = SimpleNamespace(next_token_logits=logits.clone())
                ids = sampling.sample(original, None, out, info)
                segs.prepare(fb)
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode(0)
    return reqs, ids, out, recorder


@check("sampling step, batch change and segment ids: no host sync")
def check_no_sync(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reqs, ids, out, recorder = _step(device, sync_mode=device == "cuda")
    if recorder is not None and recorder.calls:
        raise AssertionError(f"host-synchronising calls in the per-step path: {recorder.calls}")
    # The merged token is every member's, and the counters read at finish say 3 merged steps.
    sampling.record_agreement(None, None, SimpleNamespace(logits_output=out))
    ids = ids.tolist()
    for g in range(3):
        if len({ids[i] for i in range(4 * g, 4 * g + 4)}) != 1:
            raise AssertionError(f"group {g}: members got different tokens {ids[4 * g:4 * g + 4]}")
    sampling.report_finished(reqs[0])
    info = reqs[0].customized_info["sgl_merge"][-1]
    if info["merged_steps"] != 3 or not 0 <= info["agreement"] <= 1:
        raise AssertionError(f"agreement counters read at finish: {info}")
    how = "under torch.cuda.set_sync_debug_mode('error')" if device == "cuda" else "host-sync recorder on CPU"
    return f"{how}; merged steps {info['merged_steps']}, agreement {info['agreement']:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller kernel benchmark")
    args = p.parse_args()
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        print("no CUDA device: running the CPU-capable checks, skipping the GPU ones", flush=True)
    for run in (check_kernels, check_compile, check_segments_eager, check_segments_graph, check_no_sync, check_bench):
        run(args)
    print("\nsummary:")
    for name, verdict, detail in RESULTS:
        print(f"  {verdict:4}  {name}" + (f": {detail}" if verdict != "PASS" else ""))
    return 1 if any(v == "FAIL" for _, v, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())

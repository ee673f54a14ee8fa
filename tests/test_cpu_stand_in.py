"""sgl-merge's torch stand-in for sgl_kernel: each CPU function SGLang imports is there, and each
either matches a plain reference or refuses by name."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_merge.cpu import STAND_IN_DIR


@pytest.fixture(scope="module")
def stand_in():
    """Import the stand-in as `sgl_kernel` for this module's tests, then restore sys.modules."""
    saved = {k: v for k, v in sys.modules.items() if k == "sgl_kernel" or k.startswith("sgl_kernel.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STAND_IN_DIR))
    try:
        mod = importlib.import_module("sgl_kernel")
        mamba = importlib.import_module("sgl_kernel.mamba")
        yield mod, mamba
    finally:
        sys.path.remove(str(STAND_IN_DIR))
        for k in [k for k in sys.modules if k == "sgl_kernel" or k.startswith("sgl_kernel.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def sglang_cpu_imports() -> set[tuple[str, str]]:
    """Every (module, name) with a `_cpu` name that SGLang imports from sgl_kernel."""
    import sglang

    found = set()
    for path in Path(sglang.__file__).parent.rglob("*.py"):
        text = path.read_text(errors="replace")
        if "sgl_kernel" not in text:
            continue
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sgl_kernel":
                found |= {(node.module, a.name) for a in node.names if a.name.endswith("_cpu")}
    return found


def test_every_cpu_function_sglang_imports_is_provided(stand_in):
    wanted = sglang_cpu_imports()
    assert len(wanted) >= 10  # the scan itself works
    missing = sorted(
        f"{m}.{n}" for m, n in wanted if not callable(getattr(importlib.import_module(m), n, None))
    )
    assert not missing, f"stand-in lacks: {missing}"


def reference_assign(req_pool_indices, req_to_token, start, end, out_cache_loc):
    pt = 0
    for i in range(len(req_pool_indices)):
        n = int(end[i] - start[i])
        req_to_token[int(req_pool_indices[i]), int(start[i]) : int(end[i])] = out_cache_loc[pt : pt + n]
        pt += n


@pytest.mark.parametrize("seed", range(5))
def test_assign_req_to_token_pool_matches_reference(stand_in, seed):
    g = torch.Generator().manual_seed(seed)
    bs, pool_len = 6, 64
    req_pool_indices = torch.randperm(16, generator=g)[:bs]
    start = torch.randint(0, 30, (bs,), generator=g)
    end = start + torch.randint(0, 20, (bs,), generator=g)  # some requests add nothing
    out_cache_loc = torch.randint(0, 10_000, (int((end - start).sum()) + 3,), generator=g)
    got = torch.full((16, pool_len), -1, dtype=torch.int32)
    want = got.clone()
    stand_in[0].assign_req_to_token_pool_cpu(req_pool_indices, got, start, end, out_cache_loc, pool_len)
    reference_assign(req_pool_indices, want, start, end, out_cache_loc.to(torch.int32))
    assert torch.equal(got, want)


def test_copy_all_layer_kv_cache_matches_reference(stand_in):
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(32, 4, 8, generator=g) for _ in range(3)] + [
        torch.randn(32, 16, generator=g).to(torch.bfloat16)
    ]
    want = [t.clone() for t in layers]
    src = torch.tensor([3, 7, 9, 30])
    tgt = torch.tensor([7, 1, 2, 31])  # 7 is both read and written: sources are read first
    for t in want:
        t[tgt] = t[src].clone()
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.uint64)
    strides = torch.tensor([t[0].numel() * t.element_size() for t in layers])
    stand_in[0].copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, ref in zip(layers, want):
        assert torch.equal(got, ref)


def test_unsupported_functions_name_themselves(stand_in):
    sgl_kernel, mamba = stand_in
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.verify_tree_greedy_cpu: speculative decoding is not supported on CPU"):
        sgl_kernel.verify_tree_greedy_cpu(torch.zeros(1))
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.mamba\.causal_conv1d_fn_cpu"):
        mamba.causal_conv1d_fn_cpu()


def test_unknown_names_fail_loudly(stand_in):
    with pytest.raises(ImportError):
        exec("from sgl_kernel import silu_and_mul", {})


def test_stand_in_refuses_a_gpu_machine():
    code = (
        "import sys, torch; torch.cuda.is_available = lambda: True; "
        f"sys.path.insert(0, {str(STAND_IN_DIR)!r}); import sgl_kernel"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "stand-in for sgl_kernel is on the import path of a machine with a GPU" in out.stderr


def test_cpu_env_uses_stand_in_only_when_real_package_cannot_load(monkeypatch):
    import sgl_merge.cpu as cpu

    monkeypatch.setattr(cpu, "real_sgl_kernel_loads", lambda env=None: False)
    env = cpu.cpu_engine_env({"PYTHONPATH": "/opt/x"})
    assert env == {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": f"{STAND_IN_DIR}:/opt/x"}
    monkeypatch.setattr(cpu, "real_sgl_kernel_loads", lambda env=None: True)
    assert cpu.cpu_engine_env({"SGLANG_USE_CPU_ENGINE": "0"}) == {}


def test_multi_rank_cpu_servers_give_each_rank_its_own_cores(monkeypatch):
    """SGLang's CPU engine puts one rank per NUMA node unless told otherwise, so `--dp-size 2`
    failed on a one-node machine; the launcher now splits the cores (unless the user set them)."""
    import sgl_merge.cpu as cpu

    monkeypatch.setattr(cpu, "real_sgl_kernel_loads", lambda env=None: True)
    assert cpu.threads_bind(2, [0, 1]) == "0|1"
    assert cpu.threads_bind(3, list(range(8))) == "0-1|2-3|4-5"
    base = {"SGLANG_USE_CPU_ENGINE": "1"}
    assert cpu.cpu_engine_env(base, ranks=1) == {}
    assert cpu.cpu_engine_env(base, ranks=2)[cpu.THREADS_BIND].count("|") == 1
    assert cpu.cpu_engine_env({**base, cpu.THREADS_BIND: "0|1"}, ranks=2) == {}
    with pytest.raises(ValueError, match="need at least 3 CPU cores"):
        cpu.threads_bind(3, [0, 1])

"""What of the GPU path a CPU can prove: the kernels' torch fallback, the device check script's CPU
mode, the modules a GPU machine without SGLang imports, and ParaThinker detection of hub ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sgl_merge.kernels import merge_logits as kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def triton_state(monkeypatch):
    monkeypatch.setattr(kernels, "triton_failure", None)
    monkeypatch.setattr(kernels, "warm_seconds", None)
    return kernels


def test_a_failed_compile_at_warm_up_leaves_the_torch_path_serving(triton_state, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly aborted")

    assert triton_state.merge_backend("cuda") == "triton"
    monkeypatch.setattr(kernels, "merge_logits_triton", broken)
    kernels.warm_up("cpu", vocab=1000)  # no exception reaches the caller (the scheduler)
    assert "PTX assembly aborted" in kernels.triton_failure and "V=1000" in kernels.triton_failure
    assert kernels.merge_backend("cuda") == "torch"
    assert "the torch path serves" in caplog.text
    assert kernels.backend_status("cuda:0")["backend"] == "torch"


def test_a_launch_that_fails_to_compile_merges_with_torch_instead(triton_state, monkeypatch):
    """A width or dtype that was not warmed and fails to compile: that merge and every later one
    take the torch path, with the same result."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(kernels, "merge_logits_triton", broken)
    monkeypatch.setattr(kernels, "merge_backend", lambda device: "triton" if kernels.triton_failure is None else "torch")
    logits = torch.randn(6, 50)
    tables = kernels.pack_groups([([0, 3, 5], [1.0, 2.0, 1.0], "logits"), ([1, 2], [1.0, 1.0], "probs")])
    expected = logits.clone()
    kernels.merge_logits_reference(expected, *tables)
    for _ in range(2):
        got = logits.clone()
        kernels.merge_logits_(got, *tables, modes=kernels.modes_of(["logits", "probs"]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == [1] and "out of shared memory" in kernels.triton_failure


@pytest.mark.parametrize("modes", [["logits"], ["logits", "entropy"], ["probs", "logprobs"]])
def test_the_torch_path_given_the_modes_in_use_equals_the_reference(modes):
    gen = torch.Generator().manual_seed(len(modes))
    logits = 3 * torch.randn(9, 300, generator=gen)
    logits[torch.rand(9, 300, generator=gen) < 0.1] = -float("inf")
    groups = [([0, 4, 7], [1.0, 0.5, 2.0], modes[0]), ([2, 3], [1.0, 1.0], modes[-1]), ([8], [1.0], modes[0])]
    tables = kernels.pack_groups(groups, k_max=4)
    expected, got = logits.clone(), logits.clone()
    kernels.merge_logits_reference(expected, *tables)
    kernels.merge_logits_torch(got, *tables, modes=kernels.modes_of(modes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[[1, 5, 6]], logits[[1, 5, 6]])  # rows in no group untouched


def test_the_device_check_runs_on_a_cpu_and_says_what_it_skipped():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "no CUDA device: running the CPU-capable checks, skipping the GPU ones" in out
    assert out.count("SKIP") >= 8 and "FAIL" not in out
    assert "PASS  segment ids against a plain reference" in out
    assert "PASS  sampling step, batch change and segment ids: no host sync" in out


def test_the_kernels_runtime_and_segment_ids_import_without_sglang():
    """A GPU machine lent for checks has torch and triton, not SGLang: what gpu_check uses must import."""
    code = ("import sys; sys.modules['sglang'] = None\n"
            "import sgl_merge, sgl_merge.kernels, sgl_merge.runtime.sampling, sgl_merge.models.parathinker\n"
            "assert sgl_merge.__version__\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _hub_cache(root: Path, repo: str, weights: list[str]) -> None:
    """A Hugging Face hub cache entry for `repo` as a download leaves it: refs/main, one snapshot."""
    from safetensors.torch import save_file

    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    save_file({name: torch.zeros(2) for name in weights}, str(snapshot / "model.safetensors"))


def test_a_parathinker_given_as_a_hub_id_is_detected_from_its_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sgl_merge.models import parathinker

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path, "org/para", ["model.layers.0.self_attn.seg_embeddings.weight", "lm_head.weight"])
    _hub_cache(tmp_path, "org/plain", ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
    parathinker._has_segment_weights.cache_clear()

    def config(repo):
        return SimpleNamespace(hf_config=SimpleNamespace(architectures=["Qwen2ForCausalLM"]), model_path=repo,
                               revision=None)

    assert parathinker.is_parathinker(config("org/para"))
    assert not parathinker.is_parathinker(config("org/plain"))
    assert not parathinker.is_parathinker(config("org/not-downloaded"))  # offline: a warning, plain Qwen2
    parathinker._has_segment_weights.cache_clear()

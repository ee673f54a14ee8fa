"""The real SGLang CPU server started by `sgl-merge serve`, with the plugin active."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest
import requests

from sgl_merge import __version__
from sgl_merge.testing import ServeProcess, free_port


def test_plugin_is_active_in_the_scheduler(server):
    info = requests.get(f"{server.url}/server_info", timeout=10).json()
    status = info["internal_states"][0]["sgl_merge"]
    assert status["active"] is True
    assert status["version"] == __version__
    assert status["sglang_version"] == "0.5.23"
    assert f"sgl-merge {__version__} active (sglang 0.5.23)" in server.log()


def test_cpu_defaults_were_applied(server):
    info = requests.get(f"{server.url}/server_info", timeout=10).json()
    assert info["device"] == "cpu"
    assert info["attention_backend"] == "torch_native"
    assert info["sampling_backend"] == "pytorch"
    assert info["disable_overlap_schedule"] is True
    assert info["max_total_tokens"] == 20000
    assert info["sleep_on_idle"] is True
    assert info["dtype"] == "float32"  # the user's own flag wins over defaults


def test_generate_batch_returns_tokens(server):
    prompts = ["Think step by step: 12 + 30 =", "def add(a, b):", "The quick brown fox"]
    r = requests.post(
        f"{server.url}/generate",
        json={"text": prompts, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == len(prompts)
    for item in out:
        assert len(item["output_ids"]) == 12
        assert item["meta_info"]["finish_reason"]["type"] == "length"
    # greedy decoding is deterministic: the same request gives the same tokens
    again = requests.post(
        f"{server.url}/generate",
        json={"text": prompts[0], "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}},
        timeout=120,
    ).json()
    assert again["output_ids"] == out[0]["output_ids"]


def test_bad_arguments_get_sglangs_own_message():
    out = subprocess.run(
        [sys.executable, "-m", "sgl_merge.cli", "serve", "--model-path", "x", "--no-such-flag"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in out.stderr


def test_more_cpu_ranks_than_cores_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "sgl_merge.cli", "serve", "--model-path", "x", "--device", "cpu", "--dp-size", "4096"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "4096 ranks (dp_size * tp_size * pp_size) need at least 4096 CPU cores" in out.stderr


def test_serve_help_explains_cpu_defaults_and_lists_sglang_flags():
    out = subprocess.run(
        [sys.executable, "-m", "sgl_merge.cli", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "SGLANG_USE_CPU_ENGINE=1" in out.stdout and "--model-path" in out.stdout


@pytest.mark.server
def test_serve_starts_and_ctrl_c_stops_every_process(tiny_model, tmp_path):
    """A second, short-lived server: started as a user would, then stopped by Ctrl-C. (SIGTERM is
    checked on every run by the session server's teardown, which fails on leftover processes.)
    Startup time is not asserted (it took 64 s once on a cold CI machine beside the other test
    servers); the timeout only catches a server that never comes up."""
    srv = ServeProcess(["--model-path", str(tiny_model), "--device", "cpu", "--port", str(free_port())],
                       log_path=tmp_path / "serve.log", timeout=240)
    with srv:
        tree = srv.processes()
        assert len(tree) >= 3  # launcher, sglang launch_server, scheduler (+ detokenizer)
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, f"left running: {[p.info for p in alive]}"
    assert "stopping the server" in srv.log()

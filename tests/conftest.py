"""Shared fixtures: one small model, and the real CPU SGLang servers the tests share (the main one
started by `sgl-merge serve`), each started once per test session.

Markers (pyproject.toml): every test that talks to a real SGLang server is marked `server` (found
here from the fixtures it uses, or marked where it starts one itself), and the gateway's tests also
`gateway`; `pytest -m "not server"` runs the fast rest in about two minutes."""

from __future__ import annotations

import pytest
import requests

from sgl_merge.server import ServerProcess
from sgl_merge.testing import ServeProcess, build_tiny_model, free_port

# Flags every test server uses on top of `sgl-merge serve`'s CPU defaults: fp32 end to end so
# outputs can be compared exactly with a Hugging Face reference, and a tool-call parser (the tiny
# model speaks ChatML) for the OpenAI routes' tool tests. JSON grammars allow no free whitespace: a
# random model sampling whitespace could otherwise spend any token budget before closing the object.
TEST_SERVER_FLAGS = ["--dtype", "float32", "--log-level", "warning", "--tool-call-parser", "qwen25",
                     "--constrained-json-disable-any-whitespace"]


# Fixtures that start a real SGLang server (here and in test modules); a test using one, directly
# or through another fixture, is a `server` test.
SERVER_FIXTURES = {"server", "variant_server", "dp_server", "non_thinking_server", "stock_server", "key_server",
                   "kv_server", "reasoner_server", "gateway", "pt_server", "pt_chunked_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        # A fixture the test uses, or one it takes by name (parametrized over servers, getfixturevalue).
        params = getattr(getattr(item, "callspec", None), "params", {})
        used = set(getattr(item, "fixturenames", ())) | {v for v in params.values() if isinstance(v, str)}
        if SERVER_FIXTURES & used:
            item.add_marker(pytest.mark.server)
        if item.module.__name__ == "test_gateway":
            item.add_marker(pytest.mark.gateway)
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """A real SGLang server with the sgl-merge plugin, started by the `sgl-merge serve` command."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    argv = ["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS]
    # A short merge-group timeout so the timeout test does not wait the default 30 s, and a short
    # heartbeat so a think_merge stream's silent thinking shows one at once.
    env = {"SGLANG_MERGE_GROUP_TIMEOUT": "4", "SGLANG_MERGE_STREAM_HEARTBEAT": "0.3"}
    with ServeProcess(argv, log_path=log, env=env) as srv:
        yield srv


@pytest.fixture(scope="session")
def variant_server(tiny_model, tmp_path_factory):
    """The same model under what the main server does not run: SGLang's overlap scheduler (its GPU
    default; `sgl-merge serve` turns it off on CPUs), retraction of running requests every 3
    forwards (SGLang's own test switch) with a small KV budget, a reasoning parser, at most 8 requests
    per prefill batch, and requests with a priority refused (priority scheduling is off)."""
    log = tmp_path_factory.mktemp("variant") / "server.log"
    srv = ServerProcess.prepare(["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS,
                                 "--max-total-tokens", "3000", "--reasoning-parser", "qwen3",
                                 "--prefill-max-requests", "8", "--abort-on-priority-when-disabled"],
                                log_path=str(log))
    srv.argv.remove("--disable-overlap-schedule")
    srv.env.update(SGLANG_TEST_RETRACT="1", SGLANG_TEST_RETRACT_INTERVAL="3")
    srv.start()
    try:
        assert requests.get(f"{srv.url}/server_info", timeout=10).json()["disable_overlap_schedule"] is False
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def dp_server(tiny_model, tmp_path_factory):
    """Data parallelism on the CPU: `sgl-merge serve --dp-size 2` (two scheduler ranks, one core
    each, which the launcher binds), SGLang's own default scheduler on CPUs (no overlap), and
    retraction every 3 forwards with a small KV budget per rank."""
    log = tmp_path_factory.mktemp("dp") / "server.log"
    argv = ["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS,
            "--dp-size", "2", "--max-total-tokens", "3000"]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}
    with ServeProcess(argv, log_path=log, env=env, timeout=300) as srv:
        yield srv


@pytest.fixture(scope="session")
def non_thinking_server(tmp_path_factory):
    """A second configuration in one server: a model without <think> / </think> tokens, and two
    features merging refuses: SGLang's priority scheduling with preemption, and mixed chunked prefill
    (which needs chunked prefill, off by default on CPUs)."""
    model = build_tiny_model(tmp_path_factory.mktemp("non-thinking"), think_tokens=False)
    log = tmp_path_factory.mktemp("non-thinking-server") / "server.log"
    argv = ["--model-path", str(model), "--port", str(free_port()), *TEST_SERVER_FLAGS, "--enable-priority-scheduling",
            "--enable-mixed-chunk", "--chunked-prefill-size", "512"]
    with ServeProcess(argv, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    """The same weights in Hugging Face transformers: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def stock_server(tiny_model, tmp_path_factory):
    """The same SGLang server without the sgl-merge plugin."""
    log = tmp_path_factory.mktemp("stock") / "server.log"
    srv = ServerProcess.prepare(["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS],
                                log_path=str(log))
    srv.env["SGLANG_PLUGINS"] = "none"
    srv.start(require_plugin=False)
    try:
        assert srv.status is None  # really without the plugin
        yield srv
    finally:
        srv.stop()

"""A server started with --api-key: the frontend (merge_gen, think_merge, parathink, the KV-join
RuntimeEndpoint) and `sgl-merge eval` send the key with every request, a missing or wrong key is
reported as an API-key error (never as "sgl-merge not active"), and every route the plugin serves
or extends requires the key while SGLang's own health probe stays open."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
import sglang as sgl

import sgl_merge
from sgl_merge import MergeError, merge_gen, merge_gen_stream, parathink, think_merge
from sgl_merge.frontend import APIKeyError, ensure_merge_server
from sgl_merge.server import ServerProcess, plugin_status
from sgl_merge.testing import free_port

from conftest import TEST_SERVER_FLAGS

KEY = "secret"
WRONG = "not-the-key"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def key_server(tiny_model, tmp_path_factory):
    """The tiny model behind --api-key."""
    log = tmp_path_factory.mktemp("api-key-server") / "server.log"
    srv = ServerProcess.prepare(["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS,
                                 "--api-key", KEY], log_path=str(log))
    srv.start()  # ready only once the plugin's status, read with the server's key, says active
    try:
        status = plugin_status(srv.url, api_key=KEY)
        assert status and status["active"], status
        yield srv
    finally:
        srv.stop()


def wait_released(url: str, timeout: float = 10.0) -> None:
    """Until the server keeps no source and locks no cache (what an unreleased join would leave)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = plugin_status(url, api_key=KEY)
        if not status["kept_sources"] and status["locked_cache_tokens"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"sources still kept: {plugin_status(url, api_key=KEY)}")


# ------------------------------------------------------------------ programs with the key


@sgl.function
def merged(s):
    s += "Question: what is 12 + 30?\n"
    forks = s.fork(2)
    for i in range(2):
        forks[i] += f"Thought {i}: add the tens.\nAnswer:"
    s["answer"] = merge_gen(forks, "answer", max_tokens=6, temperature=0, ignore_eos=True)
    s["pieces"] = list(merge_gen_stream(forks, "again", max_tokens=6, temperature=0, ignore_eos=True))
    s["again"] = [f["again"] for f in forks]
    forks.join()


@sgl.function
def thinker(s, opts):
    s += "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    think_merge(s, **opts)


@sgl.function
def para(s, opts):
    s += "Question: what is 12 + 30? Think, then answer.\n"
    parathink(s, **opts)


@sgl.function
def joined(s):
    s += "USER: Please memorize these statements.\n"
    forks = s.fork(2)
    forks += lambda i: f"Statement {i}: fact number {i}.\n"
    forks.join(mode="concate_and_append")
    s += "Question: which facts?\nASSISTANT:" + sgl.gen("answer", max_tokens=4, temperature=0, ignore_eos=True)


@pytest.mark.timeout(240)
def test_merge_gen_and_its_stream_send_the_endpoints_key(key_server):
    state = merged.run(backend=sgl.RuntimeEndpoint(key_server.url, api_key=KEY))
    assert state.error() is None
    assert state["answer"] and state["pieces"]
    assert state["again"] == ["".join(state["pieces"])] * 2


@pytest.mark.timeout(240)
def test_think_merge_sends_the_key_with_traces_scoring_aborts_and_the_merge(key_server):
    state = thinker.run(opts=dict(first=2, n=3, thinking_budget=200, thinking_temperature=1.0, max_tokens=4,
                                  weighting="confidence"), backend=sgl.RuntimeEndpoint(key_server.url, api_key=KEY))
    outcome = state.get_meta_info("answer_traces")
    assert outcome.count("merged") == 2 and len(outcome) == 3
    assert len(state.get_meta_info("answer_confidence")["confidences"]) == 2
    # Nothing left running (the third trace ended): SGLang flushes its cache only when idle.
    assert requests.post(f"{key_server.url}/flush_cache", headers=BEARER, timeout=30).status_code == 200


@pytest.mark.timeout(240)
def test_parathink_sends_the_key_with_keeps_the_join_and_the_release_after_a_failure(key_server):
    backend = sgl.RuntimeEndpoint(key_server.url, api_key=KEY)
    state = para.run(opts=dict(paths=2, thinking_budget=16, thinking_temperature=1.0, max_tokens=4), backend=backend)
    assert state.get_meta_info("answer_traces") == ["merged", "merged"]
    assert len(state.get_meta_info("answer_join")["paths"]) == 2
    wait_released(key_server.url)
    # The summary request fails after the paths were kept: parathink releases them itself, through
    # /sgl_merge/release, which needs the key too (else they would stay kept for their TTL).
    with pytest.raises(MergeError, match="HTTP 400"):
        para.run(opts=dict(paths=2, thinking_budget=8, thinking_temperature=1.0, max_tokens=4, temperature=-1.0),
                 backend=backend)
    wait_released(key_server.url)


@pytest.mark.timeout(240)
def test_the_kv_join_endpoint_sends_the_key_and_releases_its_sources(key_server):
    state = joined.run(backend=sgl_merge.RuntimeEndpoint(key_server.url, api_key=KEY))
    assert state.error() is None and state["answer"]
    wait_released(key_server.url)  # the end-of-program release went through


# ------------------------------------------------------------------ a missing or wrong key


def _refused(e, missing: bool) -> None:
    text = str(e.value)
    assert ("requires an API key (HTTP 401)" if missing else "refused the API key (HTTP 401)") in text, text
    assert "api_key=" in text and "sgl-merge active" not in text and WRONG not in text, text


@pytest.mark.timeout(240)
def test_a_missing_or_wrong_key_is_an_api_key_error_not_a_plain_server(key_server):
    url = key_server.url
    for key, missing in ((None, True), (WRONG, False)):
        with pytest.raises(APIKeyError) as e:
            ensure_merge_server(url, api_key=key)
        _refused(e, missing)
        with pytest.raises(APIKeyError) as e:  # the KV-join endpoint says so before SGLang's own first request
            sgl_merge.RuntimeEndpoint(url, api_key=key)
        _refused(e, missing)
    ensure_merge_server(url, api_key=KEY)
    # SGLang's RuntimeEndpoint checks the key once, when made; a server restarted with another key
    # (or a key changed on the backend) is reported by every sgl-merge call.
    programs = [(merged, {}), (thinker, {"opts": dict(k=2, thinking_budget=8, max_tokens=2)}),
                (para, {"opts": dict(paths=2, thinking_budget=8, max_tokens=2)})]
    for key, missing in ((None, True), (WRONG, False)):
        for program, args in programs:
            backend = sgl.RuntimeEndpoint(url, api_key=KEY)
            backend.api_key = key
            with pytest.raises(APIKeyError) as e:
                program.run(backend=backend, **args)
            _refused(e, missing)


@pytest.mark.timeout(60)
def test_plugin_status_says_the_key_is_needed_instead_of_the_plugin_being_absent(key_server):
    missing = plugin_status(key_server.url)
    assert missing["active"] is False and "requires an API key (HTTP 401)" in missing["error"], missing
    wrong = plugin_status(key_server.url, api_key=WRONG)
    assert wrong["active"] is False and "refused the API key (HTTP 401)" in wrong["error"], wrong
    assert plugin_status(key_server.url, api_key=KEY)["active"] is True


@pytest.mark.timeout(300)
def test_eval_sends_its_api_key_and_names_a_missing_or_wrong_one(key_server, tmp_path):
    dataset = tmp_path / "math.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(2)))

    def run_eval(out, *extra):
        return subprocess.run([sys.executable, "-m", "sgl_merge.cli", "eval", "--url", key_server.url, "--dataset",
                               str(dataset), "--out", str(tmp_path / out), "--k", "2", "--thinking-budget", "8",
                               "--answer-tokens", "4", "--prompt", "{question}", *extra],
                              capture_output=True, text=True, timeout=240)

    r = run_eval("with-key", "--api-key", KEY)  # every method, parathink's keep, join and release included
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"] for row in json.loads((tmp_path / "with-key" / "summary.json").read_text())["rows"]}
    assert rows == {"single", "vote@2", "merge@2", "parathink@2"}
    wait_released(key_server.url)
    missing = run_eval("without-key")
    assert missing.returncode == 1 and "requires an API key (HTTP 401)" in missing.stderr, missing.stderr[-2000:]
    assert "--api-key" in missing.stderr
    wrong = run_eval("wrong-key", "--api-key", WRONG)
    assert wrong.returncode == 1 and "refused the API key (HTTP 401)" in wrong.stderr, wrong.stderr[-2000:]
    assert WRONG not in wrong.stderr


# ------------------------------------------------------------------ the routes


def _plugin_routes() -> list[tuple[str, set[str]]]:
    """The HTTP routes the plugin adds to SGLang's app (whatever `add_routes` adds, now and later)."""
    from fastapi import FastAPI

    from sgl_merge.serving.join_routes import add_routes

    app = FastAPI()
    before = {id(r) for r in app.routes}
    add_routes(app)
    return [(r.path, set(r.methods)) for r in app.routes if id(r) not in before]


@pytest.mark.timeout(240)
def test_every_plugin_route_requires_the_key_and_health_stays_open(key_server):
    url = key_server.url
    routes = _plugin_routes()
    assert {"/sgl_merge/release", "/concate_and_append_request"} <= {path for path, _ in routes}
    for path, methods in routes:
        for method in sorted(methods | {"GET"}):
            for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY}):
                r = requests.request(method, f"{url}{path}", json={}, headers=headers, timeout=30)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            r = requests.request(method, f"{url}{path}", json={}, headers=BEARER, timeout=30)
            assert r.status_code not in (401, 403), (method, path, r.status_code, r.text)
            assert r.status_code == (400 if method in methods else 405), (method, path, r.status_code, r.text)
    # The plugin's fields on SGLang's routes, and its status (in /server_info).
    fields = [("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2, "think_merge": {"k": 2, "thinking_budget": 4}}),
              ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                           "parathink": {"paths": 2, "thinking_budget": 4}}),
              ("POST", "/generate", {"text": ["Hi", "Ho"], "sampling_params": {
                  "max_new_tokens": 2, "custom_params": {"sgl_merge": {"group": "g-api-key", "size": 2}}}}),
              ("GET", "/server_info", None)]
    for method, path, body in fields:
        r = requests.request(method, f"{url}{path}", json=body, timeout=120)
        assert r.status_code == 401, (path, r.status_code, r.text)
        r = requests.request(method, f"{url}{path}", json=body, headers=BEARER, timeout=120)
        assert r.status_code == 200, (path, r.status_code, r.text)
    # SGLang keeps its own probes open (k8s, Prometheus); the plugin adds none.
    assert requests.get(f"{url}/health", timeout=30).status_code == 200

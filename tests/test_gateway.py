"""sgl-merge behind SGLang's model gateway (smg, `pip install smg`): the real gateway binary in front of
two real CPU workers started by `sgl-merge serve`, with the settings README's "Scaling out" gives."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import requests
from conftest import TEST_SERVER_FLAGS
from merge_reference import check_merged_greedy
from test_merge_groups import PROMPTS

from sgl_merge.testing import ServeProcess, free_port

SMG = shutil.which("smg")
pytestmark = pytest.mark.skipif(SMG is None, reason="smg (SGLang's model gateway) is not installed: pip install smg")
WORKER = "x-smg-routed-worker-id"  # the response header naming the worker that served a request
# README "Scaling out": keyed routing, and no retry or overload re-pick that could move a member.
GATEWAY_FLAGS = ["--policy", "consistent_hashing", "--disable-retries", "--disable-worker-overload-protection"]


class Gateway:
    def __init__(self, url: str, workers: list, proc: subprocess.Popen):
        self.url, self.workers, self.proc = url, workers, proc


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway")
    with ExitStack() as stack:
        serves = [ServeProcess(["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS],
                               log_path=d / f"worker{i}.log", env={"SGLANG_MERGE_GROUP_TIMEOUT": "10",
                                                                        "SGLANG_MERGE_REQUIRE_ROUTING_KEY": "1"})
                  for i in range(2)]
        with ThreadPoolExecutor(2) as pool:  # start both at once
            workers = list(pool.map(stack.enter_context, serves))
        port = free_port()
        argv = [SMG, "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                "--worker-urls", *[w.url for w in workers], *GATEWAY_FLAGS]
        proc = subprocess.Popen(argv, stdout=open(d / "smg.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(_stop, proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (d / "smg.log").read_text()[-3000:]
            try:  # ready once both workers are registered (smg registers them in the background)
                if len(requests.get(f"{url}/workers", timeout=5).json().get("workers", [])) == 2:
                    break
            except (requests.RequestException, ValueError, AttributeError):
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"smg not ready: {(d / 'smg.log').read_text()[-3000:]}")
        yield Gateway(url, workers, proc)


def _stop(proc: subprocess.Popen) -> None:
    """smg runs as a launcher and a router process: end the whole process group."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def one_request_group(contexts, weights=None, max_new_tokens=16, **sampling):
    """A whole group in one /generate: all contexts as input_ids, one shared sampling_params."""
    entry = {"group": uuid.uuid4().hex, "size": len(contexts)}
    if weights is not None:
        entry["weights"] = weights
    return {"input_ids": contexts, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                       "ignore_eos": True, **sampling,
                                                       "custom_params": {"sgl_merge": entry}}}


def test_groups_in_one_request_land_whole_on_one_worker_and_both_workers_serve(gateway, hf_model, tokenizer):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    bodies = [one_request_group(contexts[: 2 + i % 2], weights=[1.0, 2.0, 3.0][: 2 + i % 2], max_new_tokens=8)
              for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{gateway.url}/generate", json=b, timeout=300), bodies))
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        out = r.json()
        assert len({tuple(o["output_ids"]) for o in out}) == 1
        weights = body["sampling_params"]["custom_params"]["sgl_merge"]["weights"]
        check_merged_greedy(hf_model, body["input_ids"], out[0]["output_ids"], "logits", weights)
    assert {r.headers[WORKER] for r in responses} == {w.url for w in gateway.workers}


def test_members_sent_separately_with_one_routing_key_meet_on_one_worker(gateway, tokenizer):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    groups = [uuid.uuid4().hex for _ in range(6)]

    def member(args):
        group, ctx = args
        body = {"input_ids": ctx, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True,
                                                      "custom_params": {"sgl_merge": {"group": group, "size": 2}}}}
        return requests.post(f"{gateway.url}/generate", json=body, headers={"X-SMG-Routing-Key": group}, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(member, [(g, c) for g in groups for c in contexts]))
    for a, b in zip(responses[::2], responses[1::2]):
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.headers[WORKER] == b.headers[WORKER]
        assert a.json()["output_ids"] == b.json()["output_ids"]


def test_a_member_sent_apart_without_a_routing_key_is_refused_at_once_naming_the_header(gateway, tokenizer):
    """Workers behind the gateway run with SGLANG_MERGE_REQUIRE_ROUTING_KEY=1: an unkeyed member
    that could land on another worker than the rest is a 400 now, not a wait for the timeout (10 s
    here); a whole group in one request needs no key."""
    ctx = tokenizer.encode(PROMPTS[0])
    body = {"input_ids": ctx, "sampling_params": {"temperature": 0, "max_new_tokens": 4,
                                                  "custom_params": {"sgl_merge": {"group": uuid.uuid4().hex, "size": 2}}}}
    start = time.monotonic()
    r = requests.post(f"{gateway.url}/generate", json=body, timeout=60)
    assert r.status_code == 400 and "X-SMG-Routing-Key" in r.text and "in one request" in r.text, r.text
    assert time.monotonic() - start < 5
    whole = requests.post(f"{gateway.url}/generate", json=one_request_group([ctx, ctx], max_new_tokens=4), timeout=60)
    assert whole.status_code == 200, whole.text
    plain = requests.post(f"{gateway.url}/generate", json={"input_ids": ctx, "sampling_params": {"max_new_tokens": 2}},
                          timeout=60)
    assert plain.status_code == 200, plain.text


def test_the_frontend_works_through_the_gateway(gateway):
    """merge_gen (one request), merge_gen_stream and think_merge (first 2 of 3: the third trace is
    ended by closing its stream, as the gateway serves no /abort_request) over smg."""
    import sglang as sgl

    from sgl_merge import merge_gen, merge_gen_stream, think_merge

    @sgl.function
    def program(s):
        s += "Question: what is 12 + 30?\n"
        forks = s.fork(3)
        for i in range(3):
            forks[i] += f"Thought {i}.\nAnswer:"
        s["merged"] = merge_gen(forks, "merged", max_tokens=8, temperature=0, ignore_eos=True, weights=[1, 2, 3])
        s["streamed"] = "".join(merge_gen_stream(forks, "streamed", max_tokens=8, temperature=0, ignore_eos=True))
        s["forks"] = [f["merged"] for f in forks]
        forks.join()
        s["answer"] = think_merge(s, first=2, n=3, thinking_budget=48, max_tokens=8, temperature=0)

    state = program.run(backend=sgl.RuntimeEndpoint(gateway.url))
    assert state["forks"] == [state["merged"]] * 3 and state["merged"]
    assert state["streamed"] and state["answer"]
    outcome = state.get_meta_info("answer_traces")
    assert outcome.count("merged") == 2 and len(outcome) == 3
    # The greedy merges equal the same program's on one worker directly (the traces are sampled).
    direct = program.run(backend=sgl.RuntimeEndpoint(gateway.workers[0].url))
    assert (direct["merged"], direct["streamed"]) == (state["merged"], state["streamed"])


def test_openai_think_merge_through_the_gateway(gateway):
    model = requests.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 8,
            "think_merge": {"k": 2, "thinking_budget": 16}}
    r = requests.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["sgl_merge"]["k"] == 2 and len(r.json()["sgl_merge"]["agreement"]) == 2
    with requests.post(f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert lines[-1].strip() == "data: [DONE]" and len(lines) > 2


def test_the_research_agent_works_through_the_gateway(gateway, tmp_path):
    """Every request of an agent carries one routing key, so its steps stay on one worker's cache."""
    from sgl_merge.research.agent import AgentConfig, ResearchAgent
    from sgl_merge.research.command import build_toolset
    from sgl_merge.research.synthetic import CORPUS

    tools = build_toolset("local", corpus=str(CORPUS), visit=False, top_k=1)
    cfg = AgentConfig(k=2, max_steps=3, min_calls=2, think_tokens=12, call_tokens=48, answer_tokens=8,
                      temperature=0.8, seed=2, system_prompt="Use the tools.\n{tools}\n{date}")
    trace = ResearchAgent(gateway.url, tools, cfg).run("Where was the founder of Ragul born?")
    assert [s.action for s in trace.steps] == ["tool_call", "tool_call", "answer"]
    assert all(s.observation for s in trace.steps[:2]) and trace.answer is not None
    # The history of step 2 came from the cache of the worker that served step 1.
    assert trace.steps[1].cached_tokens >= trace.steps[0].history_tokens


def test_a_killed_worker_fails_its_groups_clearly_and_the_other_worker_finishes(gateway, tokenizer):
    """Last in this module: it kills worker 1 (SIGKILL to every process of it). One long group runs
    on each worker (X-SMG-Target-Worker 0 and 1 are the two workers, in the gateway's order)."""
    import json
    import signal

    contexts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    results = {}

    def run(target):
        start = time.monotonic()
        try:
            r = requests.post(f"{gateway.url}/generate", json=one_request_group(contexts, max_new_tokens=400),
                              headers={"X-SMG-Target-Worker": str(target)}, timeout=300)
            results[target] = (r.status_code, r.text, r.headers.get(WORKER), time.monotonic() - start)
        except requests.RequestException as e:
            results[target] = (None, str(e), None, time.monotonic() - start)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim, survivor = gateway.workers[1], gateway.workers[0]
    for proc in victim.processes():
        proc.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    ok = [r for r in results.values() if r[0] == 200]
    failed = [r for r in results.values() if r[0] != 200]
    assert len(ok) == 1 and len(failed) == 1, results
    status, text, worker, _ = ok[0]
    assert worker == survivor.url and len({tuple(o["output_ids"]) for o in json.loads(text)}) == 1
    status, text, _, took = failed[0]
    assert took < 120, (status, text, took)  # an error at once (the gateway's 5xx), not a hang

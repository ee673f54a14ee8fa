"""The `think_merge` field on /v1/chat/completions and /v1/completions, driven by the official
`openai` client against the real CPU server (and raw HTTP where the client would hide the wire)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import openai
import pytest
import requests
import sglang as sgl

from sgl_merge import parathink, think_merge

QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]
COMPLETION_PROMPT = "Question: what is 12 + 30?\n"
GREEDY = {"thinking_budget": 16, "thinking_temperature": 0.0}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, merge, *, messages=QUESTION, extra_body=None, **kwargs):
    """One chat completion, greedy, 12 answer tokens unless overridden; `merge` is the
    think_merge entry (None: an ordinary request)."""
    body = {"skip_special_tokens": False, **(extra_body or {})}
    if merge is not None:
        body["think_merge"] = merge
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, extra_body=body, **kwargs)


def ext(response) -> dict:
    return response.model_extra["sgl_merge"]


@sgl.function
def frontend_think_merge(s, prompt, k):
    s += prompt
    think_merge(s, k=k, max_tokens=12, temperature=0, **GREEDY)


def frontend_traces(state) -> list[str]:
    return [t.removesuffix("</think>").strip() for t in state["answer_thinking"]]


def test_chat_answer_equals_the_frontend_think_merge(server, client, tokenizer):
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ref = frontend_think_merge.run(prompt=prompt, k=2, backend=sgl.RuntimeEndpoint(server.url))
    r = chat(client, {"k": 2, **GREEDY})
    assert r.choices[0].message.content == ref["answer"]
    assert ext(r)["traces"] == frontend_traces(ref)
    assert ext(r)["trace_outcomes"] == ["merged", "merged"]


def test_completion_answer_equals_the_frontend_think_merge(server, client):
    ref = frontend_think_merge.run(prompt=COMPLETION_PROMPT, k=3, backend=sgl.RuntimeEndpoint(server.url))
    r = client.completions.create(model="tiny", prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"think_merge": {"k": 3, **GREEDY}, "skip_special_tokens": False})
    assert r.choices[0].text == ref["answer"]
    assert ext(r)["traces"] == frontend_traces(ref)


def test_usage_counts_every_thinking_and_answer_token(client, tokenizer):
    r = chat(client, {"k": 3, "thinking_budget": 24, "thinking_temperature": 1.0}, logprobs=True,
             extra_body={"ignore_eos": True})  # sampled traces: the answer must not stop early
    info, usage, message = ext(r), r.usage, r.choices[0].message
    assert info["k"] == 3 and info["mode"] == "logits" and info["trace_outcomes"] == ["merged"] * 3
    assert len(info["thinking_tokens"]) == 3 and all(1 <= n <= 24 for n in info["thinking_tokens"])
    assert info["answer_tokens"] == len(r.choices[0].logprobs.content) == 12
    assert usage.completion_tokens == sum(info["thinking_tokens"]) + info["answer_tokens"]
    assert usage.completion_tokens_details.reasoning_tokens == sum(info["thinking_tokens"])
    plain = chat(client, None, max_tokens=1).usage.prompt_tokens  # the chat prompt, as the server counts it
    assert usage.prompt_tokens == plain + len(tokenizer.encode("<think>\n", add_special_tokens=False))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # every merged trace is in reasoning_content, under its own header; each branch reports agreement
    assert len(info["traces"]) == 3 and len(info["agreement"]) == 3
    assert all(0.0 <= a <= 1.0 for a in info["agreement"])
    for i, trace in enumerate(info["traces"]):
        assert f"[trace {i + 1}/3]\n{trace}" in message.model_extra["reasoning_content"]


def test_streaming_yields_the_same_answer_after_progress_chunks(server, client):
    errors_before = server.log().count("Exception in ASGI application")
    merge = {"k": 2, **GREEDY}
    whole = chat(client, merge)
    chunks = list(chat(client, merge, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == whole.choices[0].message.content
    progress = [c.model_extra["sgl_merge"] for c in chunks if not c.choices and c.model_extra.get("sgl_merge")]
    assert progress[0]["phase"] == "thinking" and progress[-1]["phase"] == "done"
    assert progress[-1]["traces"] == ext(whole)["traces"]
    assert progress[-1]["agreement"] == ext(whole)["agreement"]
    first_content = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    thinking = [i for i, c in enumerate(chunks) if not c.choices and (c.model_extra.get("sgl_merge") or {}).get("phase")
                in ("thinking", "answering")]
    assert thinking and max(thinking) < first_content  # progress comes before the answer
    reasoning = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.model_extra.get("reasoning_content")]
    assert len(reasoning) == 1 and reasoning[0] < first_content
    assert chunks[reasoning[0]].choices[0].delta.model_extra["reasoning_content"] == \
        whole.choices[0].message.model_extra["reasoning_content"]
    usage = next(c.usage for c in chunks if c.usage is not None)
    assert usage.completion_tokens == whole.usage.completion_tokens
    time.sleep(2.5)  # SGLang's abort-on-disconnect task runs 2 s after a stream ends: it must not fail
    assert server.log().count("Exception in ASGI application") == errors_before


def test_first_of_k_answers_with_the_first_traces_and_aborts_the_rest(server, client):
    r = chat(client, {"k": 4, "first": 2, "thinking_budget": 600, "thinking_temperature": 1.0})
    info = ext(r)
    assert info["trace_outcomes"].count("merged") == 2 and len(info["traces"]) == 2
    assert len(info["agreement"]) == 2
    assert r.usage.completion_tokens == sum(info["thinking_tokens"]) + info["answer_tokens"]
    assert requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 200  # nothing left running


def hf_confidence(hf_model, prompt_ids: list[int], trace_ids: list[int], window: int | None = None) -> float:
    """DeepConf trace confidence computed independently, from Hugging Face's logits: the mean over
    the trace's tokens (or the lowest window) of minus the mean of the top-5 logprobs."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + trace_ids])).logits[0].double()
    at = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(trace_ids)]
    c = -torch.log_softmax(at, -1).topk(5, dim=-1).values.mean(-1)
    if window is None or window >= len(c):
        return float(c.mean())
    return float(c.unfold(0, window, 1).mean(-1).min())


@sgl.function
def frontend_confident_merge(s, prompt, **kwargs):
    s += prompt
    think_merge(s, max_tokens=8, temperature=0, name="answer", **kwargs)


@pytest.mark.parametrize("window", [None, 4])
def test_frontend_confidence_equals_an_independent_computation_and_keep_drops_the_least_confident(
        server, hf_model, tokenizer, window):
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    state = frontend_confident_merge.run(prompt=prompt, k=4, thinking_budget=12, thinking_temperature=1.2,
                                         weighting="confidence", keep=2, confidence_window=window,
                                         backend=sgl.RuntimeEndpoint(server.url))
    info = state.get_meta_info("answer_confidence")
    opened = prompt if prompt.rstrip().endswith("<think>") else prompt + "<think>\n"  # as think_merge opens it
    prompt_ids = requests.post(f"{server.url}/tokenize", json={"prompt": opened, "add_special_tokens": True},
                               timeout=30).json()["tokens"]
    expected = [hf_confidence(hf_model, prompt_ids, ids, window) for ids in info["output_ids"]]
    assert info["confidences"] == pytest.approx(expected, abs=2e-3)
    assert len(set(round(c, 3) for c in expected)) > 1, "sampled traces should differ in confidence"
    outcomes = state.get_meta_info("answer_traces")
    assert sorted(outcomes) == ["dropped, least confident"] * 2 + ["merged"] * 2
    kept = [i for i, c in enumerate(info["confidences"]) if c >= sorted(info["confidences"])[2]]
    assert info["weights"] == pytest.approx([info["confidences"][i] for i in kept])
    assert len(state["answer_thinking"]) == 2 and len(state.get_meta_info("answer")) == 2


def test_http_confidence_weighting_and_keep(server, client):
    r = chat(client, {"k": 4, "thinking_budget": 12, "thinking_temperature": 1.2, "weighting": "confidence",
                      "keep": 3})
    info = ext(r)
    assert info["weighting"] == "confidence" and info["keep"] == 3 and len(info["confidences"]) == 4
    assert all(c > 0 for c in info["confidences"]) and len(info["traces"]) == 3
    (dropped,) = info["dropped"]
    assert info["trace_outcomes"][dropped] == "dropped, least confident"
    assert info["trace_outcomes"].count("merged") == 3
    assert info["confidences"][dropped] == min(info["confidences"])
    assert info["weights"] == [c for i, c in enumerate(info["confidences"]) if i != dropped]
    assert len(info["agreement"]) == 3


def test_http_confidence_equals_the_frontends_on_the_same_greedy_traces(server, client, tokenizer):
    """Greedy traces are the same on both paths: the server's decode-time logprobs and the
    frontend's recomputed ones give the same confidence (float noise aside)."""
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ref = frontend_confident_merge.run(prompt=prompt, k=2, weighting="confidence", **GREEDY,
                                       backend=sgl.RuntimeEndpoint(server.url))
    r = chat(client, {"k": 2, "weighting": "confidence", **GREEDY}, max_tokens=8)
    assert ext(r)["confidences"] == pytest.approx(ref.get_meta_info("answer_confidence")["confidences"], abs=1e-3)
    assert r.choices[0].message.content == ref["answer"]


def test_entropy_mode_through_the_think_merge_field(client):
    r = chat(client, {"k": 2, "mode": "entropy", "tau": 0.5, "thinking_budget": 12, "thinking_temperature": 1.0})
    assert ext(r)["mode"] == "entropy" and r.choices[0].message.content


def test_tool_calls_are_parsed_by_sglangs_parser(client):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    ask = [{"role": "user", "content": "weather in Paris?"}]
    plain = chat(client, None, messages=ask, tools=TOOLS, tool_choice=forced, max_tokens=80)
    merged = chat(client, {"k": 2, **GREEDY}, messages=ask, tools=TOOLS, tool_choice=forced, max_tokens=80)
    for r in (plain, merged):
        calls = r.choices[0].message.tool_calls
        assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather"
        json.loads(calls[0].function.arguments)  # the parser's JSON
    assert ext(merged)["answer_tokens"] == 80


@pytest.mark.parametrize("which", ["server", "variant_server"])
def test_response_format_json_schema_constrains_the_merged_answer(request, which):
    """Think freely, answer in JSON: the grammar applies to the merged answer only (a fresh schema,
    so each member compiles it on its own while the group forms). The variant server runs a
    reasoning parser, under which SGLang would hold the grammar back until a further </think>."""
    client = openai.OpenAI(base_url=f"{request.getfixturevalue(which).url}/v1", api_key="none", max_retries=0,
                           timeout=120)
    word = uuid.uuid4().hex[:6]
    schema = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no", word]}, "sure": {"type": "boolean"}},
              "required": ["verdict", "sure"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    r = chat(client, {"k": 3, "thinking_budget": 24, "thinking_temperature": 0.8}, response_format=fmt,
             max_tokens=64, temperature=0.7)
    answer = json.loads(r.choices[0].message.content)
    assert answer["verdict"] in ("yes", "no", word) and isinstance(answer["sure"], bool)
    assert len(ext(r)["traces"]) == 3 and "<think>" not in r.choices[0].message.content


@pytest.mark.parametrize("merge, extra, param", [
    ({"k": 0}, {}, "think_merge.k"),
    ({"k": 100000}, {}, "think_merge.k"),
    ({"k": 2, "budget": 5}, {}, "think_merge.budget"),
    ({"k": 2, "first": 3}, {}, "think_merge.first"),
    ({"k": 2, "mode": "mean"}, {}, "think_merge.mode"),
    ({"k": 2, "thinking_temperature": -1}, {}, "think_merge.thinking_temperature"),
    ({"k": 2, "weighting": "loudest"}, {}, "think_merge.weighting"),
    ({"k": 2, "keep": 3}, {}, "think_merge.keep"),
    ({"k": 3, "first": 2, "keep": 3}, {}, "think_merge.keep"),
    ({"k": 2, "confidence_window": 8}, {}, "think_merge.confidence_window"),
    ({"k": 2, "tau": 0.5}, {}, "think_merge.tau"),
    ({"k": 2, "mode": "entropy", "tau": -1}, {}, "think_merge.tau"),
    ({"mode": "logits"}, {}, "think_merge.k"),
    ("yes", {}, "think_merge"),
    ({"k": 2}, {"n": 2}, "n"),
    ({"k": 2}, {"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs.enable_thinking"),
])
def test_bad_input_is_a_400_naming_the_field(server, merge, extra, param):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "think_merge": merge, **extra}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["param"] == param and param.split(".")[-1] in error["message"]
    if merge == {"k": 100000}:
        assert "--max-running-requests" in error["message"]


def test_bad_input_through_the_client_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError, match="think_merge.k"):
        chat(client, {"k": -1})
    batch = requests.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [COMPLETION_PROMPT] * 2, "max_tokens": 2, "think_merge": {"k": 2}})
    assert batch.status_code == 400 and batch.json()["param"] == "prompt"
    assert chat(client, {"k": 2, **GREEDY}).choices[0].message.content


def _no_request_left(url: str, within: float) -> float:
    """Seconds until /flush_cache succeeds (it refuses while any request runs or waits)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if requests.post(f"{url}/flush_cache", timeout=30).status_code == 200:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"requests still running {within} s after the client went away")


# The tiny model's longest greedy trace among the prompts we tried (232 tokens before </think>):
# with many such traces, the thinking phase is still running when the client goes away.
LONG_THINKER = [{"role": "user", "content": "Problem 7: what is 7 * 14?"}]


def _long_call(merge, **extra):
    return {"model": "tiny", "messages": LONG_THINKER, "temperature": 0, "think_merge": merge, **extra}


def _still_running(url: str) -> bool:
    return requests.post(f"{url}/flush_cache", timeout=30).status_code != 200


@pytest.mark.parametrize("phase", ["thinking", "answer"])
def test_a_disconnect_mid_stream_aborts_every_trace_and_member(server, phase):
    if phase == "thinking":  # many long traces: nothing is sent before one finishes
        body = _long_call({"k": 64, "thinking_budget": 4000, "thinking_temperature": 0}, max_tokens=8)
    else:  # short thinking, then a merged answer of 3 x 4000 tokens, far more than 10 s of work here
        body = _long_call({"k": 3, "thinking_budget": 4, "thinking_temperature": 0}, max_tokens=4000,
                          ignore_eos=True)
    with requests.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200
        if phase == "answer":  # the first answer text: the members are decoding (not a progress chunk)
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: {") and any(
                        (choice.get("delta") or {}).get("content") for choice in json.loads(line[5:]).get("choices", [])):
                    break
        else:  # silent thinking: heartbeats (after 0.3 s of silence on the test server)
            heartbeat = next(json.loads(line[5:])["sgl_merge"] for line in r.iter_lines(decode_unicode=True)
                             if line.startswith("data:") and '"elapsed_s"' in line)
            assert heartbeat["phase"] == "thinking" and heartbeat["elapsed_s"] >= 0.3
        assert _still_running(server.url)  # the client leaves in the middle of the work
    assert _no_request_left(server.url, within=10) < 10


def test_a_disconnect_of_a_waiting_non_streaming_client_aborts_everything(server):
    body = _long_call({"k": 3, "thinking_budget": 4, "thinking_temperature": 0}, max_tokens=4000, ignore_eos=True)
    done = threading.Event()

    def call():
        try:
            requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.5)
        except requests.Timeout:
            pass  # the client gives up and closes the connection
        done.set()

    threading.Thread(target=call, daemon=True).start()
    assert done.wait(30)
    assert _still_running(server.url)
    # SGLang notices a vanished non-streaming client at its next disconnect poll
    assert _no_request_left(server.url, within=20) < 20


def test_without_think_merge_both_routes_match_stock_sglang(server, stock_server):
    for route, body in [
        ("chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 3}),
        ("completions", {"prompt": COMPLETION_PROMPT, "logprobs": 3}),
    ]:
        body = {"model": "tiny", "max_tokens": 16, "temperature": 0, **body}
        outs = []
        for url in (server.url, stock_server.url):
            requests.post(f"{url}/flush_cache", timeout=30).raise_for_status()
            out = requests.post(f"{url}/v1/{route}", json=body, timeout=60).json()
            out.pop("id"), out.pop("created")
            outs.append(out)
        assert outs[0] == outs[1]


def test_a_non_thinking_model_is_a_400(non_thinking_server):
    url = non_thinking_server.url
    r = requests.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": QUESTION, "max_tokens": 4, "think_merge": {"k": 2}})
    assert r.status_code == 400 and r.json()["param"] == "think_merge"
    assert "thinking model" in r.json()["message"] and "</think>" in r.json()["message"]
    plain = requests.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": QUESTION, "max_tokens": 4})
    assert plain.status_code == 200


# ------------------------------------------------------------------ parathink


@sgl.function
def frontend_parathink(s, prompt, paths):
    s += prompt
    parathink(s, paths=paths, max_tokens=12, temperature=0, **GREEDY)


def test_parathink_field_equals_the_frontend_parathink(server, client, tokenizer):
    """The same paths and the same summary joined over them, through both APIs."""
    ref = frontend_parathink.run(prompt=COMPLETION_PROMPT, paths=2, backend=sgl.RuntimeEndpoint(server.url))
    r = client.completions.create(model="tiny", prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"parathink": {"paths": 2, **GREEDY}, "skip_special_tokens": False})
    assert r.choices[0].text == ref["answer"]
    meta = ext(r)
    assert meta["method"] == "parathink" and meta["trace_outcomes"] == ["merged", "merged"]
    assert r.usage.completion_tokens == meta["answer_tokens"] + sum(meta["thinking_tokens"])
    assert not requests.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0]["sgl_merge"][
        "kept_sources"]  # the paths are released


def test_parathink_field_streams_progress_then_the_summary(server):
    # ignore_eos: the summary over sampled paths may otherwise end before its 6 tokens
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True,
            "parathink": {"paths": 3, "first": 2, "thinking_budget": 200, "thinking_temperature": 1.0}}
    phases, content, final = [], "", None
    with requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("sgl_merge"):
                phases.append(chunk["sgl_merge"].get("phase"))
                final = chunk["sgl_merge"]
            for choice in chunk.get("choices") or []:
                content += choice["delta"].get("content") or ""
    assert "thinking" in phases and "answering" in phases and phases[-1] == "done"
    assert final["trace_outcomes"].count("merged") == 2 and final["answer_tokens"] == 6


@pytest.mark.parametrize("entry, param", [
    ({}, "parathink.paths"), ({"paths": 0}, "parathink.paths"), ({"paths": 2, "first": 3}, "parathink.first"),
    ({"paths": 2, "positions": "x"}, "parathink.positions"), ({"paths": 2, "summary_prefix": ""}, "parathink.summary_prefix"),
    ({"paths": 2, "k": 2}, "parathink.k"),
    ({"paths": 2, "layout": "parathinker"}, "parathink.layout"),  # this model has no <think1>
])
def test_bad_parathink_input_is_a_400_naming_the_field(server, entry, param):
    r = requests.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": COMPLETION_PROMPT, "max_tokens": 4, "parathink": entry})
    assert r.status_code == 400 and r.json()["param"] == param, r.text
    r = requests.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": COMPLETION_PROMPT, "max_tokens": 4, "parathink": {"paths": 2},
        "think_merge": {"k": 2}})
    assert r.status_code == 400 and "send one of them" in r.text

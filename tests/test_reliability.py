"""Inputs that crashed SGLang 0.5.23's scheduler are refused with a 400, on the
real CPU server: each test fails without its fix."""

from __future__ import annotations

import pytest
import requests
from test_merge_groups import PROMPTS, generate


@pytest.mark.parametrize("body, field", [
    ({"return_logprob": True, "top_logprobs_num": 100000}, "top_logprobs_num"),
    ({"input_ids": [1, 2, 100000]}, "input_ids"),
    ({"input_ids": [1, -5]}, "input_ids"),
    ({"text": ""}, "prompt is empty"),
    ({"sampling_params": {"max_new_tokens": 2, "top_k": 2**40}}, "top_k"),
    ({"return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ({"sampling_params": {"max_new_tokens": 2, "min_new_tokens": 1, "stop_token_ids": [100000]}}, "stop_token_ids"),
    ({"positional_embed_overrides": [1]}, "positional_embed_overrides"),
    ({"sampling_params": {"max_new_tokens": 2, "n": 2**31}}, "sampling_params.n"),
])
def test_inputs_that_crashed_the_scheduler_are_400s_and_the_server_keeps_serving(server, tokenizer, body, field):
    """Each of these killed SGLang 0.5.23's scheduler (found by fuzzing the request fields), taking
    every client's connection with it."""
    ids = tokenizer.encode(PROMPTS[0])
    request = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}, **body}
    if "text" in body:
        del request["input_ids"]
    r = requests.post(f"{server.url}/generate", json=request, timeout=60)
    assert r.status_code == 400 and field in r.text, r.text
    ok = generate(server, ids, {"max_new_tokens": 2}, return_logprob=True, top_logprobs_num=5)
    assert ok.status_code == 200 and len(ok.json()["meta_info"]["output_top_logprobs"][0]) == 5


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "Hello", "n": 2**31}, "sampling_params.n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "n": 2**31}, "sampling_params.n"),
    ("/v1/completions", {"prompt": "Hello", "min_tokens": 1, "stop_token_ids": [100000]}, "stop_token_ids"),
])
def test_the_openai_routes_refuse_them_too(server, route, body, field):
    """`n = 2**31` wedged the HTTP process (SGLang builds 2**31 requests before validating anything)."""
    r = requests.post(f"{server.url}{route}", json={"model": "m", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and field in r.text, r.text
    assert requests.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2},
                         timeout=60).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"sampling_params": {"max_new_tokens": 2, "stop_regex": "("}}, "stop_regex"),
    ({"sampling_params": {"max_new_tokens": 2, "n": None}}, "sampling_params.n"),
    ({"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 2}]}, "sampling_params is a list of 1"),
    ({"text": ["a", "b"], "return_logprob": [True], "top_logprobs_num": [3, 3, 3]}, "a list of"),
    ({"text": "Hello", "rid": ["a"]}, "rid must be a string"),
])
def test_malformed_fields_are_400s_naming_them_not_500s(server, body, field):
    request = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}, **body}
    r = requests.post(f"{server.url}/generate", json=request, timeout=60)
    assert r.status_code == 400 and field in r.text, (r.status_code, r.text)

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

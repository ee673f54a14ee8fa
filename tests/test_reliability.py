"""Ways a group could be split or killed wrongly, or a single request could crash the server, on the
real CPU server: each test fails without its fix."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests
from test_merge_groups import PROMPTS, generate, merge_params


def _in_thread(fn, *args, **kwargs):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)))
    t.start()
    return t, out


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


def test_an_abort_of_a_rid_that_prefixes_another_calls_member_rids_leaves_that_group_alone(server, tokenizer):
    """SGLang aborts by rid prefix; a group whose member rids merely start with the aborted rid runs on."""
    base = f"job-{uuid.uuid4().hex[:8]}"
    group = uuid.uuid4().hex
    contexts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    plain_t, plain = _in_thread(generate, server, tokenizer.encode(PROMPTS[2]),
                                {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True}, rid=base)
    group_t, grouped = _in_thread(generate, server, contexts,
                                  [merge_params(group, 2, max_new_tokens=600) for _ in contexts],
                                  rid=[f"{base}-{i}" for i in range(2)])
    time.sleep(1.5)
    requests.post(f"{server.url}/abort_request", json={"rid": base}, timeout=10)
    plain_t.join(timeout=120)
    group_t.join(timeout=120)
    assert plain["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    out = grouped["r"].json()
    assert [len(o["output_ids"]) for o in out] == [600, 600], out
    assert out[0]["output_ids"] == out[1]["output_ids"]


def test_pause_with_retract_and_continue_keeps_groups_whole(server, hf_model, tokenizer):
    """/pause_generation (mode retract) re-queues every running request as if it were new."""
    from merge_reference import check_merged_greedy

    group = uuid.uuid4().hex
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    t, result = _in_thread(generate, server, contexts, [merge_params(group, 3, max_new_tokens=400) for _ in contexts])
    time.sleep(1.0)
    assert requests.post(f"{server.url}/pause_generation", json={"mode": "retract"}, timeout=30).status_code == 200
    time.sleep(0.5)
    assert requests.post(f"{server.url}/continue_generation", json={}, timeout=30).status_code == 200
    t.join(timeout=120)
    r = result["r"]
    assert r.status_code == 200, r.text
    ids = [o["output_ids"] for o in r.json()]
    assert all(i == ids[0] for i in ids) and len(ids[0]) == 400
    check_merged_greedy(hf_model, contexts, ids[0][:24], "logits")


def test_a_member_sglang_drops_while_queueing_ends_its_group_at_once_with_sglangs_reason(variant_server, tokenizer):
    """The variant server aborts requests that carry a priority (--abort-on-priority-when-disabled)
    inside `_add_request_to_queue`, after our hook registered the member: the others used to wait
    for it and then run without it (a 500 "lost lockstep")."""
    group = uuid.uuid4().hex
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    start = time.monotonic()
    calls = [_in_thread(generate, variant_server, ctx, merge_params(group, 3, max_new_tokens=8),
                        **({"priority": 5} if i == 1 else {})) for i, ctx in enumerate(contexts)]
    for t, _ in calls:
        t.join(timeout=120)
    dropped, *others = [calls[1][1]["r"]] + [calls[i][1]["r"] for i in (0, 2)]
    assert dropped.status_code == 503 and "priority is disabled" in dropped.text, dropped.text
    for r in others:  # ended with the group, or refused because it arrived after the group ended
        assert r.status_code in (400, 503) and "priority is disabled" in r.text, (r.status_code, r.text)
    assert any("dropped by the scheduler" in r.text for r in others)
    assert time.monotonic() - start < 20  # at once, not after the 30 s group timeout


def test_a_group_larger_than_a_prefill_batch_is_refused_naming_the_flag(variant_server, tokenizer):
    """The variant server admits at most 8 requests per prefill batch (--prefill-max-requests 8): a
    group of 9 was admitted 8 at a time, split."""
    group = uuid.uuid4().hex
    contexts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(9)]
    r = generate(variant_server, contexts, [merge_params(group, 9, max_new_tokens=4) for _ in contexts])
    assert r.status_code == 400 and "--prefill-max-requests" in r.text, (r.status_code, r.text)

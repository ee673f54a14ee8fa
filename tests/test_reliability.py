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
    out = r.json()
    ids = out[0]["output_ids"]
    assert all(o["output_ids"] == ids for o in out) and len(ids) == 400
    assert 0 < len(ids)
    check_merged_greedy(hf_model, contexts, ids[:24], "logits")

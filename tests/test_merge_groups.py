"""Merge groups end to end on the real CPU server: exactness against a Hugging Face reference,
identity of members, plain requests untouched, sampling, structured output, bad input, aborts."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests
import torch
from merge_reference import check_merged_greedy, merge_rows, merged_greedy, next_logits, own_choice_agreement

PROMPTS = [
    "Think step by step: what is 12 + 30?",
    "def add(a, b):",
    "The quick brown fox jumps over",
    "Merge groups decode in lockstep; every branch keeps its own context, and",
]


def merge_params(group: str, size: int, mode: str = "logits", weight: float | None = None, tau: float | None = None,
                 **sampling):
    entry = {"group": group, "size": size, "mode": mode}
    if weight is not None:
        entry["weight"] = weight
    if tau is not None:
        entry["tau"] = tau
    return {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True, **sampling,
            "custom_params": {"sgl_merge": entry}}


def generate(server, input_ids, sampling_params, **extra):
    r = requests.post(f"{server.url}/generate",
                      json={"input_ids": input_ids, "sampling_params": sampling_params, **extra}, timeout=300)
    return r


def run_group(server, contexts, mode="logits", weights=None, tau=None, **sampling):
    group = uuid.uuid4().hex
    params = [merge_params(group, len(contexts), mode, None if weights is None else weights[i], tau, **sampling)
              for i in range(len(contexts))]
    r = generate(server, contexts, params)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("mode", ["logits", "logprobs", "probs", "entropy"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_merged_greedy_equals_reference(server, hf_model, tokenizer, k, mode):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:k]]
    out = run_group(server, contexts, mode)
    ids = [o["output_ids"] for o in out]
    assert all(x == ids[0] for x in ids), "members returned different tokens"
    assert len(ids[0]) == 32
    assert check_merged_greedy(hf_model, contexts, ids[0], mode) == 32
    for o in out:
        info = o["meta_info"]["sgl_merge"]
        assert info["size"] == k and info["mode"] == mode and info["merged_steps"] == 32
        assert 0.0 <= info["agreement"] <= 1.0


def test_weights_follow_the_weighted_mean(server, hf_model, tokenizer):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    weights = [3.0, 1.0, 0.5]
    out = run_group(server, contexts, "logits", weights)
    check_merged_greedy(hf_model, contexts, out[0]["output_ids"], "logits", weights)


def test_agreement_is_the_share_of_steps_where_a_members_own_choice_was_the_merged_token(server, hf_model, tokenizer):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    out = run_group(server, contexts, "logits", max_new_tokens=24)
    produced = out[0]["output_ids"]
    bounds = own_choice_agreement(hf_model, contexts, produced)
    assert len({lo for lo, _ in bounds}) > 1, "the case should give members different agreements"
    for o, (lo, hi) in zip(out, bounds):
        info = o["meta_info"]["sgl_merge"]
        assert info["merged_steps"] == 24
        assert lo <= info["agreement"] <= hi, (info["agreement"], lo, hi)


def test_weights_change_the_tokens(server, hf_model, tokenizer):
    """A case where ignoring the weights gives other tokens: the server follows the weights."""
    contexts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    weights = [1.0, 9.0]
    even, weighted = (merged_greedy(hf_model, contexts, 16, "logits", w) for w in (None, weights))
    assert even != weighted, "the case should be one where the weights matter"
    out = run_group(server, contexts, "logits", weights, max_new_tokens=16)
    assert check_merged_greedy(hf_model, contexts, out[0]["output_ids"], "logits", weights) == 16
    assert out[0]["output_ids"] != even


def test_a_group_can_share_one_sampling_params_with_a_weights_list(server, hf_model, tokenizer):
    """The batch shape SGLang's gateway (smg) forwards: input_ids for all members, one sampling_params."""
    contexts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    weights = [1.0, 9.0]
    params = merge_params(uuid.uuid4().hex, 2, max_new_tokens=16)
    params["custom_params"]["sgl_merge"]["weights"] = weights
    r = generate(server, contexts, params)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["meta_info"]["sgl_merge"]["weight"] for o in out] == weights
    assert out[0]["output_ids"] == out[1]["output_ids"]
    assert check_merged_greedy(hf_model, contexts, out[0]["output_ids"], "logits", weights) == 16
    params = merge_params(uuid.uuid4().hex, 2)
    params["custom_params"]["sgl_merge"]["weights"] = [1.0, 2.0, 3.0]
    r = generate(server, contexts, params)
    assert r.status_code == 400 and "sgl_merge.weights must be a list with one weight per prompt (2)" in r.text, r.text
    r = generate(server, contexts[0], params)
    assert r.status_code == 400 and "sgl_merge.weights is for a batch" in r.text, r.text


def test_probs_mode_gives_other_tokens_than_logits_which_equal_logprobs(server, hf_model, tokenizer):
    """logprobs differ from logits by one constant per row, so their weighted means give the same
    distribution (README says so); probs averages after the softmax, which is another one."""
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    by_logits, by_probs = (merged_greedy(hf_model, contexts, 16, m) for m in ("logits", "probs"))
    assert by_logits != by_probs, "the case should be one where the modes differ"
    outs = {m: run_group(server, contexts, m, max_new_tokens=16)[0]["output_ids"] for m in ("logits", "logprobs", "probs")}
    assert outs["logits"] == outs["logprobs"]
    assert check_merged_greedy(hf_model, contexts, outs["probs"], "probs") == 16
    assert outs["probs"] != outs["logits"]


def test_entropy_mode_follows_each_members_certainty_step_by_step(server, hf_model, tokenizer):
    """Per-step weights w_k exp(-H_k / tau) from each member's own distribution: a case where they
    give other tokens than the plain mean; the server follows the reference for two taus and
    reports tau; a tau with another mode, or a non-positive one, is a 400 naming the field."""
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    weights = [1.0, 2.0, 1.0]
    plain = merged_greedy(hf_model, contexts, 16, "logits", weights)
    for tau in (0.25, 2.0):
        out = run_group(server, contexts, "entropy", weights, tau=tau, max_new_tokens=16)
        assert check_merged_greedy(hf_model, contexts, out[0]["output_ids"], "entropy", weights, tau) == 16
        assert all(o["output_ids"] == out[0]["output_ids"] for o in out)
        assert {o["meta_info"]["sgl_merge"]["tau"] for o in out} == {tau}
        if tau == 0.25:
            assert out[0]["output_ids"] != plain, "the case should be one where the entropy weights matter"
    group = uuid.uuid4().hex
    r = generate(server, contexts[:2], [merge_params(group, 2, "entropy", tau=t) for t in (0.5, 1.0)])
    assert r.status_code == 400 and "sgl_merge.tau" in r.text, r.text


def test_single_member_group_equals_plain_request(server, tokenizer):
    ctx = tokenizer.encode(PROMPTS[1])
    merged = run_group(server, [ctx])[0]
    plain = generate(server, ctx, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}).json()
    assert merged["output_ids"] == plain["output_ids"]
    assert merged["meta_info"]["sgl_merge"]["agreement"] == 1.0


def test_plain_requests_untouched_when_mixed_with_groups(server, tokenizer):
    plain_ctx = [tokenizer.encode(p) for p in PROMPTS]
    plain_params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    alone = generate(server, plain_ctx, plain_params, return_logprob=True).json()
    results = {}

    def send_group(i):
        results[i] = run_group(server, [tokenizer.encode(p) for p in PROMPTS[:3]])

    threads = [threading.Thread(target=send_group, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    mixed = generate(server, plain_ctx, plain_params, return_logprob=True).json()
    for t in threads:
        t.join()
    for a, b in zip(alone, mixed):
        assert a["output_ids"] == b["output_ids"]
        # Other requests in the batch change CPU matmul shapes, hence the low bits of logprobs,
        # in stock SGLang too; bit-identity without the plugin is tested one request at a time.
        for (la, ta, _), (lb, tb, _) in zip(a["meta_info"]["output_token_logprobs"],
                                            b["meta_info"]["output_token_logprobs"]):
            assert ta == tb and abs(la - lb) < 1e-4
        assert set(a["meta_info"]) == set(b["meta_info"])  # no sgl_merge key on plain requests
    assert all(len({tuple(o["output_ids"]) for o in r}) == 1 for r in results.values())


def test_sampled_members_agree_and_follow_the_merged_distribution(server, hf_model, tokenizer):
    """300 groups of two at temperature 1: members always agree, and the first token's frequencies
    match softmax(mean of the two rows) (chi-square, false-failure rate < 1e-6)."""
    from scipy.stats import chi2

    contexts = [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[2])]
    trials = 300
    ids, params = [], []
    for _ in range(trials):
        group = uuid.uuid4().hex
        for c in contexts:
            ids.append(c)
            params.append(merge_params(group, 2, temperature=1.0, top_p=1.0, max_new_tokens=3))
    out = generate(server, ids, params).json()
    firsts = []
    for a, b in zip(out[0::2], out[1::2]):
        assert a["output_ids"] == b["output_ids"]
        firsts.append(a["output_ids"][0])
    probs = torch.softmax(merge_rows(next_logits(hf_model, contexts), "logits"), -1)
    # Bins: every token with expected count >= 5, the rest pooled.
    expected = probs * trials
    big = (expected >= 5).nonzero().flatten().tolist()
    observed = [sum(t == tok for t in firsts) for tok in big]
    exp = [float(expected[tok]) for tok in big]
    observed.append(trials - sum(observed))
    exp.append(trials - sum(exp))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, exp) if e > 0)
    assert stat < chi2.ppf(1 - 1e-6, df=len(observed) - 1), (observed, exp)


def test_members_agree_under_top_p_top_k_sampling(server, tokenizer):
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    ids, params = [], []
    for _ in range(40):
        group = uuid.uuid4().hex
        for c in contexts:
            ids.append(c)
            params.append(merge_params(group, 3, temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=16))
    out = generate(server, ids, params).json()
    groups = [out[i : i + 3] for i in range(0, len(out), 3)]
    assert all(len({tuple(o["output_ids"]) for o in g}) == 1 for g in groups)
    assert len({tuple(g[0]["output_ids"]) for g in groups}) > 1  # it really sampled


@pytest.mark.parametrize("attempt", range(8))
def test_json_schema_group_gives_valid_json_in_every_member(server, tokenizer, attempt):
    """A fresh schema each time: each member's grammar compiles on its own (a cache miss each), and
    SGLang queues a member once its own grammar is ready, possibly in the middle of an admission
    pass and before any group is known to the scheduler. Before gang admission covered that pass,
    about one attempt in three split the group."""
    word = uuid.uuid4().hex[:6]
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", word]},
                                               f"sure_{word}": {"type": "boolean"}},
              "required": ["answer"], "additionalProperties": False}
    contexts = [tokenizer.encode(p) for p in PROMPTS[:1 + attempt % 3]]
    out = run_group(server, contexts, json_schema=json.dumps(schema), max_new_tokens=64, ignore_eos=False,
                    temperature=0.7)
    texts = {o["text"] for o in out}
    assert len(texts) == 1
    assert json.loads(texts.pop())["answer"] in ("yes", "no", word)


def test_a_grammar_that_fails_to_compile_fails_the_group_at_once_naming_the_error(server, tokenizer):
    group = uuid.uuid4().hex
    t0 = time.monotonic()
    r = generate(server, [tokenizer.encode(p) for p in PROMPTS[:2]],
                 [merge_params(group, 2, regex=f"({group}") for _ in range(2)])
    assert time.monotonic() - t0 < 4  # not the group timeout
    assert r.status_code == 400 and "Failed to compile regex" in r.text, r.text
    assert generate(server, [1, 2, 3], {"max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"group": "g", "size": 0}, "sgl_merge.size"),
        ({"size": 2}, "sgl_merge.group"),
        ("not-a-dict", "sgl_merge must be an object"),
        ({"group": "g", "size": 2, "mode": "median"}, "sgl_merge.mode"),
        ({"group": "g", "size": 2, "weight": -1}, "sgl_merge.weight"),
        ({"group": "g", "size": 2, "colour": "red"}, "unknown field"),
        ({"group": "g", "size": 2, "mode": "entropy", "tau": 0}, "sgl_merge.tau must be a positive number"),
        ({"group": "g", "size": 2, "tau": 2.0}, "sgl_merge.tau is the temperature of mode 'entropy'"),
    ],
)
def test_malformed_entries_are_400_naming_the_field(server, entry, field):
    r = generate(server, [1, 2, 3], {"max_new_tokens": 4, "custom_params": {"sgl_merge": entry}})
    assert r.status_code == 400, r.text
    assert field in r.text
    assert generate(server, [1, 2, 3], {"max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize("field, values", [("temperature", (0, 0.5)), ("max_new_tokens", (8, 9)),
                                           ("top_k", (5, 6))])
def test_mismatched_sampling_parameters_are_rejected_naming_the_field(server, tokenizer, field, values):
    group = uuid.uuid4().hex
    # Sampling (not greedy), where SGLang would normalise top_k away.
    params = [merge_params(group, 2, **{"temperature": 0.7, field: v}) for v in values]
    r = generate(server, [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1])], params)
    body = r.text
    assert r.status_code == 400 and f"sampling_params.{field}" in body and group in body
    assert generate(server, [1, 2, 3], {"max_new_tokens": 2}).status_code == 200


def test_incomplete_group_times_out_saying_how_many_arrived(server, tokenizer):
    group = uuid.uuid4().hex
    t0 = time.monotonic()
    r = generate(server, tokenizer.encode(PROMPTS[0]), merge_params(group, 3))
    waited = time.monotonic() - t0
    assert "1 of 3 members arrived" in r.text and group in r.text
    assert waited < 30  # the test server runs with a short group timeout


def test_aborting_one_member_finishes_the_whole_group(server, tokenizer):
    group = uuid.uuid4().hex
    rids = [f"{group}-m{i}" for i in range(3)]
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [merge_params(group, 3, max_new_tokens=4000) for _ in rids]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", generate(server, contexts, params, rid=rids)))
    t.start()
    time.sleep(2.0)
    requests.post(f"{server.url}/abort_request", json={"rid": rids[1]}, timeout=10)
    t.join(timeout=60)
    assert not t.is_alive()
    out = result["r"].json()
    out = out if isinstance(out, list) else [out]
    for o in out:
        reason = o["meta_info"]["finish_reason"] if "meta_info" in o else o
        assert group in json.dumps(reason), o
    lengths = {len(o.get("output_ids", [])) for o in out}
    assert len(lengths) == 1 and max(lengths) < 4000


def test_openai_completions_route_joins_a_group(server, tokenizer):
    """Members sent as separate /v1/completions calls (custom_params as an SGLang extra field)."""
    group = uuid.uuid4().hex
    model = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    out = {}

    def call(i):
        out[i] = requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": model, "prompt": PROMPTS[i], "max_tokens": 16, "temperature": 0,
            "custom_params": {"sgl_merge": {"group": group, "size": 2}}}).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = [out[i]["choices"][0]["text"] for i in range(2)]
    assert texts[0] == texts[1], out


def test_members_report_identical_merged_logprobs(server, tokenizer):
    group = uuid.uuid4().hex
    contexts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [merge_params(group, 3, temperature=0.7, max_new_tokens=12) for _ in contexts]
    out = generate(server, contexts, params, return_logprob=True, top_logprobs_num=2).json()
    first = out[0]["meta_info"]
    for o in out[1:]:
        assert o["meta_info"]["output_token_logprobs"] == first["output_token_logprobs"]
        assert o["meta_info"]["output_top_logprobs"] == first["output_top_logprobs"]


def test_max_new_tokens_is_equalised_to_the_smallest_context_cap(server, tokenizer):
    """A member whose prompt nearly fills the context window caps the whole group: SGLang admits
    prompt + max_new_tokens up to the context length (4096 here), then caps each request's
    max_new_tokens one below what its own context leaves."""
    long_ctx = (tokenizer.encode(PROMPTS[3]) * 400)[:4050]
    contexts = [long_ctx, tokenizer.encode(PROMPTS[0])]
    out = run_group(server, contexts, max_new_tokens=4096 - 4050)
    lengths = [len(o["output_ids"]) for o in out]
    assert lengths[0] == lengths[1] < 4096 - 4050
    assert out[0]["output_ids"] == out[1]["output_ids"]


def test_group_larger_than_the_server_can_hold_is_rejected_with_the_limit(server):
    limit = requests.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0][
        "effective_max_running_requests_per_dp"]
    r = generate(server, [1, 2, 3], merge_params(uuid.uuid4().hex, limit + 1))
    assert str(limit) in r.text and "--max-running-requests" in r.text
    assert generate(server, [1, 2, 3], {"max_new_tokens": 2}).status_code == 200


def test_a_group_whose_prompts_exceed_one_prefill_batch_is_refused_naming_the_flags(server):
    """Members are prefilled in one batch, unchunked: together they must fit its token limit."""
    info = requests.get(f"{server.url}/server_info", timeout=10).json()
    limit = info["chunked_prefill_size"] if (info["chunked_prefill_size"] or 0) > 0 else info["max_prefill_tokens"]
    length = 3000
    k = limit // length + 1
    assert k * length < info["max_total_tokens"], "the prompts should fit the KV cache"
    gen = torch.Generator().manual_seed(3)
    contexts = [torch.randint(0, 384, (length,), generator=gen).tolist() for _ in range(k)]
    group = uuid.uuid4().hex
    r = generate(server, contexts, [merge_params(group, k, max_new_tokens=2) for _ in range(k)])
    assert r.status_code == 400 and f"needs {k * length} uncached prompt tokens" in r.text, r.text
    assert "--chunked-prefill-size" in r.text


def test_a_group_whose_prompts_exceed_the_kv_cache_is_refused_naming_the_flag(variant_server):
    """The variant server's KV cache holds 3000 tokens: two prompts of 1600 can never be resident."""
    gen = torch.Generator().manual_seed(4)
    contexts = [torch.randint(0, 384, (1600,), generator=gen).tolist() for _ in range(2)]
    group = uuid.uuid4().hex
    r = generate(variant_server, contexts, [merge_params(group, 2, max_new_tokens=2) for _ in range(2)])
    assert r.status_code == 400 and "needs 3200 KV tokens for its prompts" in r.text, r.text
    assert "--max-total-tokens" in r.text


def test_merging_is_refused_where_priority_preemption_could_split_a_group(non_thinking_server):
    """SGLang preempts running requests one at a time for a higher-priority arrival."""
    group = uuid.uuid4().hex
    r = generate(non_thinking_server, [[1, 2, 3], [4, 5]], [merge_params(group, 2) for _ in range(2)])
    assert r.status_code == 400 and "--enable-priority-scheduling" in r.text and "--disable-priority-preemption" in r.text
    assert generate(non_thinking_server, [1, 2, 3], {"max_new_tokens": 2}).status_code == 200


def test_merging_is_refused_where_mixed_chunked_prefill_could_split_a_group(non_thinking_server):
    """A mixed batch decodes some members while it prefills others; the refusal names every cause."""
    group = uuid.uuid4().hex
    r = generate(non_thinking_server, [[1, 2, 3], [4, 5]], [merge_params(group, 2) for _ in range(2)])
    assert r.status_code == 400 and "--enable-mixed-chunk" in r.text and "--enable-priority-scheduling" in r.text


def test_beam_search_cannot_join_a_group(server):
    r = generate(server, [1, 2, 3], {**merge_params("g", 2), "beam_width": 2})
    assert r.status_code == 400 and "beam_width" in r.text

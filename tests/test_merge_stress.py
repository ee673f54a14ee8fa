"""Merge groups under load, retraction and the overlap scheduler, and plain requests against stock SGLang (no plugin)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests
from merge_reference import check_merged_greedy

PROMPTS = [
    "Think step by step: what is 12 + 30?", "def add(a, b):", "The quick brown fox jumps over",
    "Merge groups decode in lockstep", "Question: sort the list [3, 1, 2].", '{"action": "search",',
    "0 1 2 3 4 5", "Every branch keeps its own context",
]


@pytest.mark.parametrize("which", ["variant_server", "dp_server"])
def test_groups_and_plain_requests_under_retraction(which, request, hf_model, tokenizer):
    """With the overlap scheduler (variant) and without it on two data-parallel ranks (dp): there a
    group split across ranks would time out on both, so merged results show members share a rank."""
    url = request.getfixturevalue(which).url
    ids = {p: tokenizer.encode(p) for p in PROMPTS}
    groups, results = [], {}
    for g in range(8):
        key = uuid.uuid4().hex
        ctx = [ids[PROMPTS[(g + j) % len(PROMPTS)]] for j in range(4)]
        groups.append((key, ctx))

    def run_group(key, ctx):
        params = [{"temperature": 0, "max_new_tokens": 32, "ignore_eos": True,
                   "custom_params": {"sgl_merge": {"group": key, "size": 4}}} for _ in ctx]
        results[key] = requests.post(f"{url}/generate", json={"input_ids": ctx, "sampling_params": params},
                                     timeout=600).json()

    def run_json_group(key):  # sampled, grammar-constrained: masks and sampling under overlap
        schema = {"type": "object", "properties": {"pick": {"enum": ["a", "b", key[:6]]}, "ok": {"type": "boolean"}},
                  "required": ["pick", "ok"], "additionalProperties": False}
        params = [{"temperature": 0.8, "max_new_tokens": 64, "json_schema": json.dumps(schema),
                   "custom_params": {"sgl_merge": {"group": key, "size": 3}}} for _ in range(3)]
        results[key] = requests.post(f"{url}/generate", json={"input_ids": [ids[p] for p in PROMPTS[:3]],
                                                               "sampling_params": params}, timeout=600).json()

    json_keys = [uuid.uuid4().hex for _ in range(4)]

    def run_plain(i):
        results[f"plain{i}"] = requests.post(
            f"{url}/generate",
            json={"input_ids": ids[PROMPTS[i % 8]],
                  "sampling_params": {"temperature": 0, "max_new_tokens": 96, "ignore_eos": True}},
            timeout=600).json()

    # Plain requests first: SGLang retracts the requests with the fewest output tokens, so the
    # groups arriving later are the ones retracted (seen: one JSON group and one or two greedy ones).
    threads = [threading.Thread(target=run_plain, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=run_json_group, args=(key,)) for key in json_keys]
    threads += [threading.Thread(target=run_group, args=g) for g in groups]
    for i, t in enumerate(threads):
        t.start()
        if i in (15, 19):
            time.sleep(1.0)
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a request hung"
    retractions = 0
    for key, ctx in groups:
        out = results[key]
        assert isinstance(out, list), out
        assert len({tuple(o["output_ids"]) for o in out}) == 1, f"group {key} diverged"
        check_merged_greedy(hf_model, ctx, out[0]["output_ids"], "logits")
        retractions += sum(o["meta_info"]["num_retractions"] for o in out)
    for key in json_keys:
        out = results[key]
        assert isinstance(out, list), out
        assert len({o["text"] for o in out}) == 1, f"group {key} diverged"
        assert json.loads(out[0]["text"])["pick"] in ("a", "b", key[:6])
        retractions += sum(o["meta_info"]["num_retractions"] for o in out)
    for i in range(16):
        assert len(results[f"plain{i}"]["output_ids"]) == 96
    assert retractions > 0, "the test did not exercise retraction"
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_plain_requests_are_bit_identical_without_the_plugin(server, stock_server, tokenizer):
    """One request at a time on flushed caches, so both servers run the same computation (CPU
    matmuls give slightly different low bits for other batch shapes or a cached prefix, with or
    without the plugin)."""
    for prompt in PROMPTS:
        for url in (server.url, stock_server.url):
            assert requests.post(f"{url}/flush_cache", timeout=30).status_code == 200
        body = {"input_ids": tokenizer.encode(prompt),
                "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
                "return_logprob": True, "top_logprobs_num": 3}
        ours = requests.post(f"{server.url}/generate", json=body, timeout=300).json()
        stock = requests.post(f"{stock_server.url}/generate", json=body, timeout=300).json()
        assert ours["output_ids"] == stock["output_ids"]
        for key in ("output_token_logprobs", "output_top_logprobs"):
            assert ours["meta_info"][key] == stock["meta_info"][key]
        assert set(ours["meta_info"]) == set(stock["meta_info"])


def test_a_group_whose_cached_prefixes_would_be_locked_is_judged_as_a_whole(variant_server):
    """Admitting a member locks its cached prefix, so the prefix stops counting as evictable KV. The
    group check must count all members' prefixes as locked: a group that fits only while the others'
    prefixes are still evictable used to be admitted member by member until the budget ran out (the
    last one left behind, the group lost: a 500 seen under retraction). Here the KV cache holds
    3000 tokens and each member reuses a cached 350-token prompt."""
    url = variant_server.url
    assert requests.post(f"{url}/flush_cache", timeout=30).status_code == 200
    prompts = [[10 + i] + [(7 * j + i) % 300 + 20 for j in range(349)] for i in range(4)]
    for p in prompts:  # now cached, unlocked: evictable
        r = requests.post(f"{url}/generate", json={"input_ids": p, "sampling_params": {"max_new_tokens": 1}}, timeout=120)
        assert r.status_code == 200, r.text

    def group(max_new):
        key = uuid.uuid4().hex
        params = [{"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True,
                   "custom_params": {"sgl_merge": {"group": key, "size": 4}}} for _ in prompts]
        return requests.post(f"{url}/generate", json={"input_ids": [p + [5, 6] for p in prompts],
                                                       "sampling_params": params}, timeout=600)

    # 4 x (2 + 450) new tokens fit beside one locked prefix (3000 - 350) but not beside four (3000 - 1400).
    r = group(450)
    assert r.status_code == 400 and "KV tokens at once" in r.text, (r.status_code, r.text)
    r = group(8)
    assert r.status_code == 200 and len({tuple(o["output_ids"]) for o in r.json()}) == 1, r.text

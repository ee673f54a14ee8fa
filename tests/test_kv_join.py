"""The KV join on a real server: `custom_params.sgl_merge_keep` keeps finished requests' KV,
`custom_params.sgl_merge_join` starts a request from prompt + each source's part. Greedy outputs
are compared with Hugging Face `past_key_values` concatenated the same way."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from merge_reference import check_joined_greedy, check_plain_greedy

PROMPT = [5, 17, 33, 40, 41, 42, 43, 44]
# Unequal source lengths: their own prompt tails and how many tokens each generates.
TAILS = [([60], 5), ([70, 71], 9), ([80, 81, 82], 2), ([90, 91, 92, 93], 13)]
CONTINUATION = [100, 101, 102]
OWNER = "test-kv-join"  # what the sources are kept under, and what joins and releases present


def post(server, body):
    return requests.post(f"{server.url}/generate", json=body, timeout=300)


def keep_sources(server, n, prompt=PROMPT, **keep):
    """Run n sources (greedy), kept; returns their rids and the tokens their KV holds (prompt +
    output but the last sampled token, which never went through the model)."""
    rids, kept, tag = [], [], uuid.uuid4().hex[:8]
    for i, (tail, steps) in enumerate(TAILS[:n]):
        rid = f"src-{tag}-{i}"
        r = post(server, {"input_ids": prompt + tail, "rid": rid, "sampling_params": {
            "temperature": 0, "max_new_tokens": steps, "ignore_eos": True,
            "custom_params": {"sgl_merge_keep": {"owner": OWNER, **keep}}}})
        assert r.status_code == 200, r.text
        rids.append(rid)
        kept.append(prompt + tail + r.json()["output_ids"][:-1])
    return rids, kept


def join(server, sources, continuation=CONTINUATION, steps=12, **fields):
    return post(server, {"input_ids": continuation, "sampling_params": {
        "temperature": 0, "max_new_tokens": steps, "ignore_eos": True,
        "custom_params": {"sgl_merge_join": {"sources": sources, "owner": OWNER, **fields}}}})


def plugin_state(server):
    return requests.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0]["sgl_merge"]


def wait_released(server, rids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = plugin_state(server)
        if not set(rids) & set(state["kept_sources"]) and state["locked_cache_tokens"] == 0:
            return state
        time.sleep(0.2)
    raise AssertionError(f"sources still kept or cache still locked: {plugin_state(server)}")


@pytest.mark.parametrize("positions", ["after_longest", "sequential"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_join_equals_concatenated_past_key_values(server, hf_model, n, positions):
    rids, kept = keep_sources(server, n)
    r = join(server, rids, prompt_len=len(PROMPT), positions=positions)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    joined_len = len(PROMPT) + sum(len(k) - len(PROMPT) for k in kept)
    assert meta["prompt_tokens"] == joined_len + len(CONTINUATION)
    assert meta["cached_tokens"] == joined_len  # only the continuation was prefilled
    assert check_joined_greedy(hf_model, kept, len(PROMPT), CONTINUATION, out["output_ids"], positions) == 12
    wait_released(server, rids)  # release_sources defaults to true: pins gone once it finished


def test_the_two_position_conventions_differ(server):
    rids, _ = keep_sources(server, 3)
    outs = [join(server, rids, positions=p, release_sources=False).json()["output_ids"]
            for p in ("after_longest", "sequential")]
    assert outs[0] != outs[1]
    assert set(rids) <= set(plugin_state(server)["kept_sources"])  # not released: they still join
    assert join(server, rids, steps=1).status_code == 200  # and this one releases them
    wait_released(server, rids)


def test_prompt_len_defaults_to_the_common_prefix_and_one_source_continues_it(server, hf_model):
    rids, kept = keep_sources(server, 3)
    r = join(server, rids)  # the sources share exactly PROMPT
    assert r.status_code == 200, r.text
    check_joined_greedy(hf_model, kept, len(PROMPT), CONTINUATION, r.json()["output_ids"])
    # One source: its whole sequence is the prompt, the join is a plain continuation of it.
    rids, kept = keep_sources(server, 1)
    r = join(server, rids)
    assert r.status_code == 200, r.text
    check_plain_greedy(hf_model, kept[0] + CONTINUATION, r.json()["output_ids"])


def test_the_joined_sequence_never_enters_the_radix_cache(server, hf_model):
    """The joined tokens are no sequential computation: sent afterwards as a plain request they must
    be computed from scratch, matching at most what a sequential request left (source 0's path)."""
    rids, kept = keep_sources(server, 3)
    r = join(server, rids, positions="sequential")
    assert r.status_code == 200, r.text
    joined = PROMPT + [t for k in kept for t in k[len(PROMPT):]] + CONTINUATION
    answer = r.json()["output_ids"]
    # Longest first (what the join's own decoding wrote too): the second may then reuse the
    # first's plain computation, which is sequential.
    for i, ids in enumerate((joined + answer[:-1], joined)):
        plain = post(server, {"input_ids": ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}).json()
        if i == 0:
            assert plain["meta_info"]["cached_tokens"] <= len(kept[0])
        check_plain_greedy(hf_model, ids, plain["output_ids"])


def test_joins_under_retraction_and_the_overlap_scheduler(variant_server, hf_model):
    """The variant server retracts running requests every 3 forwards (one of a batch stays): four
    concurrent joins of the same sources, each retracted one coming back with its claim on the
    sources' KV and its position shift intact."""
    from concurrent.futures import ThreadPoolExecutor

    rids, kept = keep_sources(variant_server, 4)
    continuations = [[100 + i, 101, 102 + i] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda c: join(variant_server, rids, c, steps=24, release_sources=False), continuations))
    for continuation, r in zip(continuations, outs):
        assert r.status_code == 200, r.text
        check_joined_greedy(hf_model, kept, len(PROMPT), continuation, r.json()["output_ids"])
    assert sum(r.json()["meta_info"]["num_retractions"] for r in outs) > 0, "the test did not exercise retraction"
    assert join(variant_server, rids, steps=1).status_code == 200  # releases them
    wait_released(variant_server, rids)


def test_input_logprobs_of_a_join_cover_its_continuation(server):
    rids, _ = keep_sources(server, 2)
    r = post(server, {"input_ids": CONTINUATION, "return_logprob": True, "logprob_start_len": 0,
                      "sampling_params": {"temperature": 0, "max_new_tokens": 4,
                                          "custom_params": {"sgl_merge_join": {"sources": rids, "owner": OWNER}}}})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert 1 <= len(meta["input_token_logprobs"]) <= len(CONTINUATION)
    assert len(meta["output_token_logprobs"]) == 4


def test_released_sources_are_refused_with_the_source_named(server):
    rids, _ = keep_sources(server, 2)
    assert join(server, rids).status_code == 200
    r = join(server, rids)
    assert r.status_code == 400
    assert f"sgl_merge_join.sources[0] = {rids[0]!r} is not a source this request may join" in r.json()["error"]["message"]


def test_kept_sources_expire_after_their_ttl(server):
    rids, _ = keep_sources(server, 2, ttl_s=1)
    assert set(rids) <= set(plugin_state(server)["kept_sources"])
    time.sleep(1.5)
    post(server, {"input_ids": [7], "sampling_params": {"max_new_tokens": 1}})  # the scheduler polls
    wait_released(server, rids)
    assert join(server, rids).status_code == 400


@pytest.mark.parametrize("fields, named", [
    ({"sources": "a"}, "sgl_merge_join.sources must be a list"),
    ({"sources": []}, "sgl_merge_join.sources must be a list"),
    ({"sources": ["a", "a"]}, "names a request twice"),
    ({"sources": ["a"], "positions": "interleaved"}, "sgl_merge_join.positions must be one of"),
    ({"sources": ["a"], "prompt_len": -1}, "sgl_merge_join.prompt_len must be an integer"),
    ({"sources": ["a"], "release": True}, "unknown field(s) ['release']"),
    ({"sources": ["a"], "release_sources": "yes"}, "sgl_merge_join.release_sources must be true or false"),
    ({"sources": ["a", "b"], "owner": ["x"]}, "sgl_merge_join.owner must be one owner for all sources or a list of 2"),
    ({"sources": ["a"], "owner": 7}, "sgl_merge_join.owner must be a non-empty string"),
])
def test_malformed_joins_are_400s_naming_the_field(server, fields, named):
    r = post(server, {"input_ids": CONTINUATION, "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"sgl_merge_join": fields}}})
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("keep, named", [
    ({"ttl_s": 0}, "sgl_merge_keep.ttl_s must be a number of seconds"),
    ({"ttl": 5}, 'sgl_merge_keep must be true or {"ttl_s": seconds, "owner"'),
    ("yes", 'sgl_merge_keep must be true or {"ttl_s": seconds, "owner"'),
    ({"owner": ""}, "sgl_merge_keep.owner must be a non-empty string"),
])
def test_malformed_keeps_are_400s_naming_the_field(server, keep, named):
    r = post(server, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"sgl_merge_keep": keep}}})
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


def test_joins_that_cannot_be_made_are_400s_naming_the_source(server):
    rids, _ = keep_sources(server, 2)
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    assert post(server, {"input_ids": PROMPT + [9], "rid": plain, "sampling_params": {"max_new_tokens": 2}}).ok
    cases = [
        ([rids[0], plain], {}, f"sources[1] = {plain!r} is not a source this request may join"),
        ([rids[0], "no-such-rid"], {}, "sources[1] = 'no-such-rid' is not a source this request may join"),
        (rids, {"prompt_len": len(PROMPT) + 1}, f"sources[1] = {rids[1]!r} does not share the first"),
        (rids, {"prompt_len": 10_000}, "prompt_len = 10000 is longer than sources[0]"),
    ]
    for sources, fields, named in cases:
        r = join(server, sources, **fields)
        assert r.status_code == 400 and named in r.json()["error"]["message"], r.text
    # None of the refusals touched the sources: they still join.
    assert join(server, rids).status_code == 200
    wait_released(server, rids)


def test_a_join_longer_than_the_context_is_a_400_naming_the_sources(server):
    prompt = [3 + i % 300 for i in range(1400)]  # 3 sources of ~1400 tokens: more than the 4096-token context together
    rids, _ = keep_sources(server, 3, prompt=prompt)
    r = join(server, rids, prompt_len=0)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "more than this server's longest input" in message and repr(rids[2]) in message
    requests.post(f"{server.url}/generate", timeout=60, json={"input_ids": [7], "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"sgl_merge_join": {"sources": rids, "owner": OWNER}}}})  # release them
    wait_released(server, rids)


def test_join_with_n_or_with_merging_is_refused(server):
    r = post(server, {"input_ids": CONTINUATION, "sampling_params": {
        "n": 2, "max_new_tokens": 2, "custom_params": {"sgl_merge_join": {"sources": ["a"]}}}})
    assert r.status_code == 400 and "sampling_params.n = 2 cannot be combined" in r.text, r.text
    r = post(server, {"input_ids": CONTINUATION, "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"sgl_merge_join": {"sources": ["a"]},
                                               "sgl_merge": {"group": "g", "size": 2}}}})
    assert r.status_code == 400 and "cannot be combined with custom_params.sgl_merge" in r.text, r.text


# ------------------------------------------------------------------ SGLang's frontend

STATEMENTS = ["Ethan is the father of Liam.", "Noah is the father of Julian.", "Oliver is the father of Carlos."]
PREFIX = "USER: Please memorize these statements.\n"
QUESTION = "Question: Who is the father of Julian?\nASSISTANT:"


def _parallel_encoding():
    import sglang as sgl

    @sgl.function
    def parallel_encoding(s, statements):
        s += PREFIX
        forks = s.fork(len(statements))
        forks += lambda i: f"Statement {i}: {statements[i]}\n"
        forks.join(mode="concate_and_append")
        s += QUESTION + sgl.gen("answer", max_tokens=10, temperature=0, ignore_eos=True, return_logprob=True)

    return parallel_encoding


def server_ids(server, text: str) -> list[int]:
    """The server's own tokenization of a prompt text (what the frontend's requests are)."""
    r = requests.post(f"{server.url}/tokenize", json={"prompt": text}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


def _answer_ids(state) -> list[int]:
    return [t[1] for t in state.get_meta_info("answer")["output_token_logprobs"]]


def test_sglangs_parallel_encoding_program_completes_on_sgl_merge_serve(server):
    """SGLang's own test program (it hangs on a stock 0.5.23 server: no /concate_and_append_request)."""
    import sglang as sgl
    from sglang.test.test_programs import test_parallel_encoding

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    try:
        test_parallel_encoding(check_answer=False)  # a tiny random model cannot name Noah
    finally:
        sgl.set_default_backend(None)
    r = requests.post(f"{server.url}/concate_and_append_request", json={"src_rids": "a"}, timeout=10)
    assert r.status_code == 400 and "src_rids must be a non-empty list" in r.text


@pytest.mark.parametrize("positions", ["after_longest", "sequential"])
def test_forks_join_concate_and_append_is_a_kv_join_with_sgl_merge_runtime_endpoint(server, hf_model, positions):
    import sglang as sgl

    import sgl_merge

    program = _parallel_encoding()
    state = program.run(statements=STATEMENTS, backend=sgl_merge.RuntimeEndpoint(server.url, positions=positions))
    sources = [server_ids(server, PREFIX + f"Statement {i}: {st}\n") for i, st in enumerate(STATEMENTS)]
    prompt_len = len(server_ids(server, PREFIX))
    assert all(s[:prompt_len] == sources[0][:prompt_len] for s in sources)
    assert check_joined_greedy(hf_model, sources, prompt_len, server_ids(server, QUESTION), _answer_ids(state),
                               positions) == 10
    wait_released(server, [])  # the forks' KV is released once the program's requests are done
    # A stock RuntimeEndpoint: the same program joins as text, a plain computation of the joined text.
    state = program.run(statements=STATEMENTS, backend=sgl.RuntimeEndpoint(server.url))
    check_plain_greedy(hf_model, server_ids(server, state.text()[: -len(state["answer"])]), _answer_ids(state))


def test_kept_sources_can_be_released_early(server):
    rids, _ = keep_sources(server, 2)
    r = requests.post(f"{server.url}/sgl_merge/release", json={"rids": rids, "owner": OWNER}, timeout=10)
    assert r.status_code == 200 and r.json()["released"] == rids
    wait_released(server, rids)
    r = requests.post(f"{server.url}/sgl_merge/release", json={"rids": "x"}, timeout=10)
    assert r.status_code == 400 and "rids must be a non-empty list" in r.text


# ------------------------------------------------------------------ parathink


def _parathinker(**opts):
    import sglang as sgl

    import sgl_merge

    @sgl.function
    def program(s):
        s += "Question: what is 12 + 30? Think, then answer.\n"
        sgl_merge.parathink(s, **opts)

    return program


@pytest.mark.parametrize("positions", ["after_longest", "sequential"])
def test_parathink_summary_reads_every_paths_kv(server, hf_model, positions):
    import sglang as sgl

    state = _parathinker(paths=3, thinking_budget=24, thinking_temperature=1.0, positions=positions, max_tokens=8,
                         temperature=0, ignore_eos=True).run(backend=sgl.RuntimeEndpoint(server.url))
    join_meta = state.get_meta_info("answer_join")
    paths = join_meta["paths"]
    assert len(paths) == 3 and len(state["answer_thinking"]) == 3 and len({tuple(p) for p in paths}) > 1
    assert state.get_meta_info("answer_traces") == ["merged"] * 3
    prompt = server_ids(server, "Question: what is 12 + 30? Think, then answer.\n")
    assert join_meta["prompt_len"] == len(prompt)
    close = server_ids(server, "</think>")
    for path, text in zip(paths, state["answer_thinking"]):
        assert path[:len(server_ids(server, "<think>\n"))] == server_ids(server, "<think>\n") and path[-1:] == close
        assert text.startswith("<think>\n") and text.endswith("</think>")
    meta = state.get_meta_info("answer")
    assert meta["cached_tokens"] == len(prompt) + sum(len(p) for p in paths)  # no path re-prefilled
    check_joined_greedy(hf_model, [prompt + p for p in paths], len(prompt), join_meta["continuation"],
                        join_meta["output_ids"], positions)
    assert state.text().endswith("\n" + state["answer"])
    wait_released(server, [])


def test_parathink_first_m_of_n_and_bad_arguments(server):
    import sglang as sgl

    from sgl_merge import MergeError

    state = _parathinker(first=2, n=4, thinking_budget=200, thinking_temperature=1.0, max_tokens=4).run(
        backend=sgl.RuntimeEndpoint(server.url))
    outcome = state.get_meta_info("answer_traces")
    assert outcome.count("merged") == 2 and len(outcome) == 4 and len(state.get_meta_info("answer_join")["paths"]) == 2
    wait_released(server, [])
    for opts, named in [(dict(paths=2, positions="diagonal"), "positions must be one of"),
                        (dict(paths=2, summary_prefix=""), "summary_prefix must be a non-empty text"),
                        (dict(), "pass paths"), (dict(first=3, n=2), "need 1 <= paths <= n")]:
        with pytest.raises(MergeError, match=named):
            _parathinker(**opts).run(backend=sgl.RuntimeEndpoint(server.url))

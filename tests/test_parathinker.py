"""ParaThinker checkpoints on a real server: a small checkpoint in the authors' layout (per-layer
`self_attn.seg_embeddings`, `<thinkN>` / `</thinkN>` / `<summary>` tokens) built by the tests,
compared with a Hugging Face-side implementation of the same layout (`ParaThinkerReference`)."""

from __future__ import annotations

import pytest
import requests

from conftest import TEST_SERVER_FLAGS
from merge_reference import ParaThinkerReference, check_joined_greedy, check_merged_greedy
from sgl_merge.contract.parathink_layout import find_control_ids, path_logit_bias, summary_logit_bias
from sgl_merge.testing import ServeProcess, build_tiny_parathinker, free_port

PROMPT = [5, 17, 33, 40, 41]


@pytest.fixture(scope="module")
def parathinker(tmp_path_factory):
    return build_tiny_parathinker(tmp_path_factory.mktemp("parathinker"), paths=4)


@pytest.fixture(scope="module")
def pt_server(parathinker, tmp_path_factory):
    log = tmp_path_factory.mktemp("parathinker-server") / "server.log"
    with ServeProcess(["--model-path", str(parathinker), "--port", str(free_port()), *TEST_SERVER_FLAGS],
                      log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def pt_chunked_server(parathinker, tmp_path_factory):
    """The same checkpoint under SGLang's overlap scheduler (its GPU default) with prefills chunked
    every 8 tokens, so a sequence's segments cross chunk boundaries and steps overlap."""
    from sgl_merge.server import ServerProcess

    log = tmp_path_factory.mktemp("parathinker-chunked") / "server.log"
    srv = ServerProcess.prepare(["--model-path", str(parathinker), "--port", str(free_port()), *TEST_SERVER_FLAGS,
                                 "--chunked-prefill-size", "8"], log_path=str(log))
    srv.argv.remove("--disable-overlap-schedule")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ref(parathinker):
    return ParaThinkerReference(parathinker)


def generate(server, ids, steps=10, **custom):
    sampling = {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}
    if custom:
        sampling["custom_params"] = custom
    r = requests.post(f"{server.url}/generate", json={"input_ids": ids, "sampling_params": sampling}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def path(ref, n, body):
    opens = {v: k for k, v in ref.opens.items()}
    closes = {v: k for k, v in ref.closes.items()}
    return [opens[n], *body, closes[n]]


def test_a_stage_may_sample_only_its_own_closing_control_token():
    vocab = {"<summary>": 9, "</summary>": 10, "<think1>": 1, "</think1>": 2, "<think2>": 3, "</think2>": 4,
             "<think>": 11, "</think>": 12}
    controls = find_control_ids(vocab.get)
    assert controls == vocab
    assert find_control_ids({"<think1>": 1, "</think1>": 2, "<think3>": 5, "</think3>": 6}.get) == {
        "<think1>": 1, "</think1>": 2}  # numbered paths end at the first one missing
    bias = path_logit_bias(controls, 2)  # plain <think> / </think> too: the authors' engine rewrites them
    assert set(bias) == {"9", "10", "1", "2", "3", "11", "12"} and all(b <= -1e4 for b in bias.values())
    bias = summary_logit_bias(controls)
    assert set(bias) == {"9", "1", "2", "3", "4", "11", "12"} and all(b <= -1e4 for b in bias.values())


@pytest.mark.parametrize("server_name", ["pt_server", "pt_chunked_server"])
def test_segments_follow_the_tokens_and_outputs_equal_the_reference(server_name, ref, request):
    """Prompt, paths and summary in one sequence (prefill), then decoding in segment 0, and a
    sequence that ends inside a path (decoding in that path's segment), stray closing tokens
    included; on the default CPU server and under chunked prefill with the overlap scheduler. The
    segment embeddings must matter: a plain Qwen2 on the same weights decodes otherwise."""
    pt_server = request.getfixturevalue(server_name)
    opens, closes = {v: k for k, v in ref.opens.items()}, {v: k for k, v in ref.closes.items()}
    cases = [PROMPT + [60, 61],
             PROMPT + path(ref, 1, [60, 61]) + path(ref, 2, [70]) + [ref.summary, 80],
             PROMPT + [opens[3], 90, 91],
             # a stray </think3> sampled inside path 1 is in segment 3 and leaves path 1's alone,
             # in a prefill and when decoding goes on right after it
             PROMPT + path(ref, 1, [60, closes[3], 61]) + [ref.summary, 80],
             PROMPT + [opens[1], 60, closes[3]],
             # control tokens sampled inside a summary leave it in segment 0 (the authors' per-stage
             # ids), in a prefill and when decoding goes on right after them
             PROMPT + path(ref, 1, [60]) + [ref.summary, 80, opens[2], 81, closes[3], 82],
             PROMPT + path(ref, 2, [70]) + [ref.summary, 80, opens[3]],
             PROMPT + [ref.summary, 80, closes[1]]]
    differs = False
    for ids in cases:
        out = generate(pt_server, ids)["output_ids"]
        assert ref.check_greedy(ids, out) == 10
        try:
            check_merged_greedy(ref.plain, [ids], out, "logits")
        except AssertionError:
            differs = True
    assert differs, "segment embeddings changed no output: the test proves nothing"


@pytest.mark.parametrize("positions", ["after_longest", "sequential"])
def test_a_summary_joined_over_paths_equals_the_reference(pt_server, ref, positions):
    """ParaThinker's summary: every path from prompt + <thinkN> (positions from the prompt's
    length), kept, then <summary> joined over all of them."""
    rids, sources = [], []
    for n, (body, steps) in enumerate([([60], 6), ([70, 71], 9), ([80], 3)], start=1):
        ids = PROMPT + path(ref, n, body)[:-1]
        out = generate(pt_server, ids, steps)["output_ids"]
        kept = ids + out + [path(ref, n, [])[-1]]  # the path, closed
        rid = f"pt-{positions}-{n}"
        r = requests.post(f"{pt_server.url}/generate", timeout=60, json={"input_ids": kept, "rid": rid,
                          "sampling_params": {"max_new_tokens": 0, "custom_params": {"sgl_merge_keep": {"owner": "pt"}}}})
        assert r.status_code == 200, r.text
        rids.append(rid)
        sources.append(kept)
    out = generate(pt_server, [ref.summary, 90], 10,
                   sgl_merge_join={"sources": rids, "owner": "pt", "prompt_len": len(PROMPT), "positions": positions})
    assert check_joined_greedy(ref, sources, len(PROMPT), [ref.summary, 90], out["output_ids"], positions) == 10
    # The joined sequence sent plainly is an ordinary sequential computation.
    joined = PROMPT + [t for s in sources for t in s[len(PROMPT):]] + [ref.summary, 90]
    assert ref.check_greedy(joined, generate(pt_server, joined, 6)["output_ids"]) == 6


@pytest.mark.parametrize("layout", [
    {"think_open": "<think{i}>", "think_close": "</think{i}>", "summary_prefix": "<summary>"},
    {},  # the defaults: a ParaThinker's own layout, read off the server's tokenizer
])
def test_parathink_with_numbered_paths(pt_server, ref, parathinker, layout):
    import sglang as sgl

    import sgl_merge

    @sgl.function
    def program(s):
        s += "Question: 12 + 30?\n"
        sgl_merge.parathink(s, paths=3, **layout, thinking_budget=12, thinking_temperature=1.0, max_tokens=6,
                            temperature=0, ignore_eos=True)

    state = program.run(backend=sgl.RuntimeEndpoint(pt_server.url))
    join = state.get_meta_info("answer_join")
    numbers = []
    controls = {*ref.opens, *ref.closes, ref.summary}
    for ids, text in zip(join["paths"], state["answer_thinking"]):  # in the order they finished
        n = ref.opens[ids[0]]
        assert ref.closes.get(ids[-1]) == n and text.startswith(f"<think{n}>") and text.endswith(f"</think{n}>")
        assert not controls & set(ids[1:-1]), ids  # no other control token sampled inside a path
        numbers.append(n)
    assert sorted(numbers) == [1, 2, 3]
    assert join["continuation"] == [ref.summary]
    assert not controls & set(join["output_ids"])  # nor inside the summary
    prompt = requests.post(f"{pt_server.url}/tokenize", json={"prompt": "Question: 12 + 30?\n"},
                           timeout=30).json()["tokens"]
    assert join["prompt_len"] == len(prompt)
    # The summary samples no control token but </summary> (summary_logit_bias): nor does the reference.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parathinker)

    def single(text):
        token_ids = tok(text, add_special_tokens=False)["input_ids"]
        return token_ids[0] if len(token_ids) == 1 else None

    banned = {int(i) for i in summary_logit_bias(find_control_ids(single))}
    check_joined_greedy(ref, [prompt + p for p in join["paths"]], len(prompt), join["continuation"],
                        join["output_ids"], "after_longest", banned=banned)


def test_the_parathink_field_takes_a_parathinkers_numbered_paths(pt_server):
    """On a ParaThinker the OpenAI field's paths are `<think{i}>` ... `</think{i}>` and its summary
    starts with `<summary>` (layout "auto"); with greedy paths its answer equals the frontend's."""
    import sglang as sgl

    import sgl_merge

    prompt = "Question: 12 + 30?\n"

    @sgl.function
    def program(s):
        s += prompt
        sgl_merge.parathink(s, paths=3, thinking_budget=12, thinking_temperature=0.0, max_tokens=6, temperature=0,
                            ignore_eos=True)

    state = program.run(backend=sgl.RuntimeEndpoint(pt_server.url))
    body = {"model": "pt", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "skip_special_tokens": False, "parathink": {"paths": 3, "thinking_budget": 12, "thinking_temperature": 0}}
    r = requests.post(f"{pt_server.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    meta = r.json()["sgl_merge"]
    assert meta["layout"] == "parathinker" and meta["trace_outcomes"] == ["merged"] * 3
    assert r.json()["choices"][0]["text"] == state["answer"]
    plain = requests.post(f"{pt_server.url}/v1/completions", timeout=300,
                          json={**body, "parathink": {**body["parathink"], "layout": "plain"}})
    assert plain.status_code == 200 and plain.json()["sgl_merge"]["layout"] == "plain"
    for entry, param, words in [({"paths": 5}, "parathink.paths", "4 numbered paths"),
                                ({"paths": 2, "layout": "numbered"}, "parathink.layout", "must be one of")]:
        bad = requests.post(f"{pt_server.url}/v1/completions", timeout=60, json={**body, "parathink": entry})
        assert bad.status_code == 400 and bad.json()["param"] == param and words in bad.text, bad.text

"""merge_gen / think_merge / vote in SGLang programs, against the real CPU server."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
import requests
import sglang as sgl

import sgl_merge
from sgl_merge import MergeError, merge_gen, merge_gen_stream, think_merge, vote

THOUGHTS = ["add the tens first", "twelve plus thirty is forty two", "count up from twelve"]


@pytest.fixture(scope="module")
def backend(server):
    return sgl.RuntimeEndpoint(server.url)


def forks_with_thoughts(s, k):
    s += "Question: what is 12 + 30?\n"
    forks = s.fork(k)
    for i in range(k):
        forks[i] += f"Thought: {THOUGHTS[i]}.\nAnswer:"
    return forks


@sgl.function
def merged_answer(s, k):
    forks = forks_with_thoughts(s, k)
    s["contexts"] = [f.text() for f in forks]
    s["answer"] = merge_gen(forks, "answer", max_tokens=16, temperature=0, ignore_eos=True)
    s["fork_texts"] = [f.text() for f in forks]
    s["fork_vars"] = [f["answer"] for f in forks]
    forks.join()


def test_merge_gen_gives_every_fork_the_runtime_contracts_answer(server, backend):
    state = merged_answer.run(k=3, backend=backend)
    answer = state["answer"]
    assert state["fork_vars"] == [answer] * 3
    assert all(t == c + answer for t, c in zip(state["fork_texts"], state["contexts"]))
    group = uuid.uuid4().hex
    ref = requests.post(f"{server.url}/generate", timeout=120, json={
        "text": state["contexts"],
        "sampling_params": [{"max_new_tokens": 16, "temperature": 0, "ignore_eos": True, "skip_special_tokens": False,
                             "custom_params": {"sgl_merge": {"group": group, "size": 3}}}] * 3}).json()
    assert ref[0]["text"] == answer


@sgl.function
def streamed_answer(s, k):
    forks = forks_with_thoughts(s, k)
    s["pieces"] = list(merge_gen_stream(forks, "answer", max_tokens=16, temperature=0, ignore_eos=True))
    s["fork_vars"] = [f["answer"] for f in forks]
    forks.join()


def test_streamed_merge_yields_the_same_answer_piece_by_piece(backend):
    answer = merged_answer.run(k=3, backend=backend)["answer"]
    state = streamed_answer.run(k=3, backend=backend)
    assert "".join(state["pieces"]) == answer and len(state["pieces"]) > 1
    assert state["fork_vars"] == [answer] * 3


@sgl.function
def thinker(s, opts):
    # A prompt of some length: the last thinking token and the closing delimiter (1-2 tokens) are
    # the only part of each branch the cache cannot hold.
    question = "What is 12 + 30? Explain every step of the addition, then give the result. " * 3
    s += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    think_merge(s, **opts)


def test_think_merge_answer_reuses_each_branch_context_from_the_cache(backend):
    state = thinker.run(opts=dict(k=2, thinking_budget=200, thinking_temperature=0.8, max_tokens=8,
                                  ignore_eos=True), backend=backend)
    assert len(state["answer_thinking"]) == 2
    assert state.text().endswith(state["answer"])
    for meta in state.get_meta_info("answer"):
        assert meta["cached_tokens"] >= 0.95 * meta["prompt_tokens"], meta
    assert state.get_meta_info("answer_traces") == ["merged", "merged"]


def test_think_merge_first_k_of_n_aborts_the_rest(server, backend):
    state = thinker.run(opts=dict(first=2, n=4, thinking_budget=300, thinking_temperature=1.0, max_tokens=4),
                        backend=backend)
    outcome = state.get_meta_info("answer_traces")
    assert outcome.count("merged") == 2 and len(outcome) == 4
    assert len(state["answer_thinking"]) == 2
    # No request left running: SGLang flushes the cache only when nothing runs or waits.
    assert requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 200


def test_vote_counts_and_picks_the_majority():
    class Fork(dict):
        pass

    forks = [Fork(ans=a) for a in ["\\boxed{42}", "\\boxed{41}", "\\boxed{42}", "no idea"]]
    extract = lambda t: t.split("{")[1].rstrip("}") if "{" in t else None  # noqa: E731
    winner, counts = vote(forks, "ans", extract=extract)
    assert winner == "42" and counts == Counter({"42": 2, "41": 1})
    assert vote([Fork(ans="a"), Fork(ans="b")], "ans") == ("a", Counter({"a": 1, "b": 1}))
    assert vote([Fork(ans="x")], "ans", extract=lambda t: None) == (None, Counter())


def test_server_without_the_plugin_is_reported_as_such(stock_server):
    @sgl.function
    def prog(s):
        s += "Hello"
        forks = s.fork(2)
        s["a"] = merge_gen(forks, "a", max_tokens=2)

    with pytest.raises(MergeError, match="does not have sgl-merge active; start it with sgl-merge serve"):
        prog.run(backend=sgl.RuntimeEndpoint(stock_server.url))


def test_bad_calls_are_reported_clearly():
    with pytest.raises(MergeError, match="at least one fork"):
        merge_gen([], "x")
    with pytest.raises(MergeError, match="pass k"):
        think_merge(None, k=2, first=2)
    with pytest.raises(MergeError, match="1 <= k <= n"):
        think_merge(None, first=3, n=2)
    assert sgl_merge.merge_gen is merge_gen


@sgl.function
def chat_thinker(s, template_opens_think):
    s += sgl.user("What is 12 + 30?")
    s += sgl.assistant_begin()
    if template_opens_think:
        s += "<think>\n"
    think_merge(s, k=2, thinking_budget=24, max_tokens=6, ignore_eos=True)
    s += sgl.assistant_end()


@pytest.mark.parametrize("template_opens_think", [False, True])
def test_think_merge_in_a_chat_program(backend, template_opens_think):
    state = chat_thinker.run(template_opens_think=template_opens_think, backend=backend)
    assert state.messages()[-1]["role"] == "assistant"
    assert state.messages()[-1]["content"].endswith(state["answer"])
    # opened once, whoever opened it (the random model may emit <think> in its answer: not counted)
    assert state.text().rsplit(state["answer"], 1)[0].count("<think>") == 1


def test_forks_of_different_programs_and_failed_forks_are_reported(backend):
    a = merged_answer.run(k=1, backend=backend)
    b = merged_answer.run(k=1, backend=backend)
    with pytest.raises(MergeError, match="different program runs"):
        merge_gen([a, b], "x", max_tokens=2)

    @sgl.function
    def broken(s):
        s += "Hello"
        forks = s.fork(2)
        forks[1] += sgl.gen("bad", max_tokens=-1)  # the server refuses it
        try:
            s["x"] = merge_gen(forks, "x", max_tokens=2)
        finally:
            forks.join()

    with pytest.raises(MergeError, match="fork 1 failed before the merge"):
        broken.run(backend=backend)


def test_a_think_close_of_several_tokens_stops_the_traces(backend, tokenizer):
    """A delimiter that is not one token stops a trace as text (before, traces ran to the budget)."""
    greedy = dict(k=1, thinking_budget=48, thinking_temperature=0, max_tokens=2)
    free = thinker.run(opts=greedy, backend=backend)["answer_thinking"][0]
    close = free[12:24]  # a piece of what the greedy trace writes anyway
    assert len(tokenizer.encode(close)) > 1 and "</think>" not in free[:24], free
    state = thinker.run(opts={**greedy, "think_close": close}, backend=backend)
    trace = state["answer_thinking"][0]
    assert trace == free[: free.index(close)] + close, (trace, free)

"""The trace engine (`sgl_merge.traces`), which the server's fields, the frontend and the evaluation
runner share: its requests pass the request contract, and its bookkeeping of n traces is what
every driver reports."""

from __future__ import annotations

import subprocess
import sys

from sgl_merge import traces as engine
from sgl_merge.contract.join import parse_join, parse_keep
from sgl_merge.contract.merge import expand_shared_weights, parse_member_spec
from sgl_merge.contract.parathink_layout import STRAY_BIAS, find_control_ids


def done(text="ok"):
    return {"text": text, "meta_info": {"finish_reason": {"type": "stop"}}}


def test_a_trace_stops_at_its_closing_token_or_text():
    assert engine.thinking_params(64, 0.6, [7]) == {"max_new_tokens": 64, "temperature": 0.6,
                                                    "skip_special_tokens": False, "stop_token_ids": [7]}
    several = engine.thinking_params(64, 0.6, [7, 8], "</end>")
    assert several["stop"] == ["</end>"] and several["no_stop_trim"] and "stop_token_ids" not in several


def test_a_trace_is_closed_only_where_its_budget_ran_out():
    assert engine.closed([1, 2, 9], 9) == [1, 2, 9]
    assert engine.closed([1, 2], 9) == [1, 2, 9]
    assert engine.closed([], 9) == [9]
    assert engine.closed([1, 8, 9], [8, 9]) == [1, 8, 9]
    assert engine.closed([1, 9], [8, 9]) == [1, 9, 8, 9]


def test_the_first_k_to_finish_are_used_in_the_order_they_finished():
    traces = engine.TraceSet(n=5, needed=2)
    traces.finish(3, done("c"))
    traces.finish(1, {"meta_info": {"finish_reason": {"type": "abort", "message": "oom"}}})
    assert not traces.enough and traces.shortfall("thinking traces") == (
        "only 1 of the 2 thinking traces needed finished: {'type': 'abort', 'message': 'oom'}")
    traces.finish(0, done("a"))
    assert traces.enough and traces.shortfall("thinking traces") is None
    traces.finish(4, done("late"))  # finished after the first two
    traces.finish(2, {"meta_info": {"finish_reason": {"type": "abort"}}})  # aborted as no longer needed
    assert traces.used == [3, 0]
    assert [traces.results[i]["text"] for i in traces.used] == ["c", "a"]
    assert traces.outcomes == [engine.USED, engine.FAILED, engine.ABORTED, engine.USED, engine.UNUSED]
    late = engine.TraceSet(n=2, needed=1)
    late.finish(0, done())
    late.finish(1, None, ConnectionError("reset"))  # an error is a failure, also once enough finished
    assert late.outcomes == [engine.USED, engine.FAILED]


def test_errors_and_missing_results_are_failures():
    traces = engine.TraceSet(n=3, needed=3)
    traces.finish(0, None, RuntimeError("connection reset"))
    traces.finish(1, {"error": "bad request"})
    traces.finish(2, None)
    assert traces.outcomes == [engine.FAILED] * 3 and traces.used == []
    assert traces.shortfall("paths").startswith("only 0 of the 3 paths needed finished: connection reset")


def test_numbered_paths_stop_where_the_checkpoint_has_no_more():
    vocab = {t: i for i, t in enumerate(["<summary>", "</summary>", "<think>", "</think>", "<think1>", "</think1>",
                                          "<think2>", "</think2>", "<think3>"])}
    controls = find_control_ids(vocab.get)
    paths = engine.numbered_paths(controls, 4)
    assert [(p.opening, p.open_id, p.closing, p.close_id) for p in paths] == [
        ("<think1>", 4, "</think1>", 5), ("<think2>", 6, "</think2>", 7)]
    # inside path 2 every control token but its own close is barred, plain <think> / </think> too
    assert paths[1].logit_bias == {str(i): STRAY_BIAS for i in (0, 1, 2, 3, 4, 5, 6)}
    assert engine.numbered_paths({}, 3) == []


def test_choose_all_uniformly_or_by_confidence():
    assert engine.choose(3) == engine.Choice([0, 1, 2], [1.0, 1.0, 1.0])
    scores = [0.5, 2.0, 1.0, 2.0]
    weighted = engine.choose(4, "confidence", confidences=scores)
    assert weighted.kept == [0, 1, 2, 3] and weighted.weights == scores
    kept = engine.choose(4, "uniform", keep=2, confidences=scores)
    assert kept.kept == [1, 3] and kept.weights == [1.0, 1.0] and kept.dropped(4) == [0, 2]
    both = engine.choose(4, "confidence", keep=3, confidences=scores)
    assert both.kept == [1, 2, 3] and both.weights == [2.0, 1.0, 2.0] and both.confidences == scores


def test_merge_requests_pass_the_contract():
    body = engine.merge_body([[1, 2], [1, 3]], {"max_new_tokens": 8, "custom_params": {"mine": 1}},
                             mode="entropy", weights=[1.0, 3.0], tau=0.5)
    assert body["sampling_params"]["custom_params"]["mine"] == 1

    class Obj:  # a GenerateReqInput's two fields that expand_shared_weights reads
        sampling_params = body["sampling_params"]

    obj = Obj()
    expand_shared_weights(obj, 2)
    specs = [parse_member_spec(p["custom_params"]) for p in obj.sampling_params]
    assert [(s.size, s.mode, s.weight, s.tau) for s in specs] == [(2, "entropy", 1.0, 0.5), (2, "entropy", 3.0, 0.5)]
    assert specs[0].group == specs[1].group
    entry = engine.member_entry("g", 4, "logits", weight=0.25)
    assert parse_member_spec({"sgl_merge": entry}).weight == 0.25 and "tau" not in entry


def test_keep_and_join_requests_pass_the_contract():
    keep = engine.keep_params("secret", ttl_s=30.0)
    assert keep["max_new_tokens"] == 0
    assert parse_keep(keep["custom_params"]).owner == "secret" and parse_keep(keep["custom_params"]).ttl_s == 30.0
    params = engine.with_entry({"temperature": 0}, "sgl_merge_join",
                               engine.join_entry(["a", "b"], "secret", 12, "sequential", release_sources=False))
    join = parse_join(params["custom_params"])
    assert (join.sources, join.prompt_len, join.positions, join.release_sources) == (("a", "b"), 12, "sequential", False)
    assert params["temperature"] == 0


def test_the_engine_imports_neither_torch_nor_sglang():
    code = ("import sys, sgl_merge.traces\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sglang')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""How sure a thinking trace was of itself, DeepConf-style, and which traces to keep.

DeepConf (Fu et al., 2025, "Deep Think with Confidence") scores a trace from the model's own
next-token distributions along it. At position i, with the top-k logprobs l_i1..l_ik,

    token confidence  C_i = -(1/k) sum_j l_ij        (large when the mass sits on one token)
    trace confidence  mean_i C_i                     (window None: over the whole trace)
                      min over windows of mean C_i   (window n: its least confident n tokens in
                                                      a row, DeepConf's "lowest group confidence")

Both are positive, so they serve directly as merge weights (DeepConf weights its votes the same
way), and ranking by them gives the adaptive selection: answer with only the most confident traces.

The top logprobs come from one prefill request over prompt + traces (`scoring_request`): the
server's own logprobs of the model's raw distributions, where the logprobs SGLang reports while
decoding are those after temperature scaling (a trace sampled at 1.2 would look less sure than
the model was) and, when streamed, repeated in every chunk. The server-side `think_merge` flow,
the frontend and the evaluation all score traces this way.
"""

from __future__ import annotations

from collections.abc import Sequence

TOP_K = 5  # top logprobs per token that the confidence averages (DeepConf's k)


def token_confidences(top_logprobs: Sequence) -> list[float]:
    """C_i for every generated token that has top logprobs (positions without any are skipped)."""
    out = []
    for entries in top_logprobs:
        if entries:
            values = [e[0] for e in entries[:TOP_K]]
            out.append(-sum(values) / len(values))
    return out


def trace_confidence(top_logprobs: Sequence, window: int | None = None) -> float:
    """The trace's confidence: the mean token confidence, or with `window` the lowest mean over
    `window` consecutive tokens (the whole trace when it is shorter). 0.0 for an empty trace."""
    c = token_confidences(top_logprobs)
    if not c:
        return 0.0
    if window is None or window >= len(c):
        return sum(c) / len(c)
    run = sum(c[:window])
    lowest = run
    for i in range(window, len(c)):
        run += c[i] - c[i - window]
        lowest = min(lowest, run)
    return lowest / window


def scoring_request(prompt_ids: list[int], traces: list[list[int]]) -> dict:
    """The /generate body (also a GenerateReqInput's fields) that returns the top logprobs of
    every trace token: one prefill each, nothing generated, the prompt served from the cache."""
    return {"input_ids": [prompt_ids + ids for ids in traces], "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1, "top_logprobs_num": TOP_K}


def scored_confidences(outputs: list[dict], traces: list[list[int]], window: int | None = None) -> list[float]:
    """Each trace's confidence from the outputs of its `scoring_request`. The logprob range starts
    at the prompt's last token (SGLang reports none for a range's first position), so the last
    len(trace) entries are the distributions each trace token was drawn from."""
    return [trace_confidence(out["meta_info"]["input_top_logprobs"][-len(ids):] if ids else [], window)
            for out, ids in zip(outputs, traces)]


def most_confident(confidences: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` most confident traces, in their original order (ties: earlier first)."""
    ranked = sorted(range(len(confidences)), key=lambda i: (-confidences[i], i))
    return sorted(ranked[:keep])


def merge_weights(confidences: Sequence[float]) -> list[float]:
    """Merge weights proportional to confidence; uniform if a trace has none (it had no logprobs)."""
    if not confidences or min(confidences) <= 0:
        return [1.0] * len(confidences)
    return [float(c) for c in confidences]

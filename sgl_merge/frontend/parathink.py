"""ParaThinker-style native parallel thinking in SGLang programs: paths, then one summary that reads
every path's KV (the KV join, `sgl_merge.runtime.join`), with no re-prefill of the paths.

    answer = sgl_merge.parathink(s, paths=4, thinking_budget=2048, max_tokens=256)

Each path thinks on its own from the prompt; the summary then continues
after prompt + path 1 + ... + path P, each path's KV as it was computed (attending to the prompt and
to itself only), its positions after the longest path (ParaThinker's convention; `positions=
"sequential"` for after the whole concatenation). On a ParaThinker checkpoint (its tokenizer has
`<think1>` and `<summary>`) the paths are its numbered ones, `<think{i}>` ... `</think{i}>`, and the
summary starts with `<summary>`: the method. On any other model the paths are `<think>` ...
`</think>` and the summary starts with a newline: a join of plain traces, which is how to compare
it with ThinkMerge (`think_merge`) on your model. The paths, the keeps and the join are the
backend's requests (`backend.MergeBackend.think`, `.join`).
"""

from __future__ import annotations

import uuid

from sgl_merge import traces as engine
from sgl_merge.contract.join import POSITIONS
from sgl_merge.contract.parathink_layout import (PATH_CLOSE, PATH_OPEN, SUMMARY_PREFIX, path_logit_bias,
                                                 summary_logit_bias)
from sgl_merge.frontend import state
from sgl_merge.frontend.backend import MergeBackend, MergeError
from sgl_merge.frontend.merge import DEFAULT_CLOSE, DEFAULT_OPEN, sampling_params, trace_counts


def parathink(s, paths: int | None = None, *, first: int | None = None, n: int | None = None,
              name: str = "answer", thinking_budget: int = 2048, thinking_temperature: float = 0.6,
              think_open: str | None = None, think_close: str | None = None,
              positions: str = "after_longest", summary_prefix: str | None = None, **summary_sampling) -> str:
    """Think along `paths` independent paths from state `s`, then write one summary over all of
    them (sampling arguments as `sgl.gen`), appended to `s` and returned. `first=m, n=N` launches N
    paths and summarises as soon as the first m finish (the others are aborted). Each path is
    `think_open` + a newline + its thinking + `think_close` (closed if it ran out of
    `thinking_budget`; when the prompt already ends with `think_open`, paths are the thinking +
    `think_close`); the summary starts with `summary_prefix` (at least one token: the join
    prefills it). Delimiters with "{i}" number the paths from 1 with no newline, as a ParaThinker
    checkpoint wants: `think_open="<think{i}>", think_close="</think{i}>", summary_prefix="<summary>"`,
    which is what the defaults (None) pick where the server's tokenizer has `<think1>` and
    `<summary>` tokens; elsewhere they are `<think>`, `</think>` and a newline.

    The paths' texts are in `s[name + "_thinking"]`, what became of every launched path in
    `s.get_meta_info(name + "_traces")`, and the join itself (prompt length, each path's token ids,
    the summary prefix's ids, the positions, the summary's ids) in `s.get_meta_info(name + "_join")`."""
    k, n = trace_counts("parathink", "paths", paths, first, n)
    if positions not in POSITIONS:
        raise MergeError(f"parathink: positions must be one of {list(POSITIONS)}, got {positions!r}")
    if (think_open is None) != (think_close is None):
        raise MergeError("parathink: give both think_open and think_close, or neither (the model's own: numbered "
                         "paths on a ParaThinker, <think> / </think> elsewhere)")
    if think_open is not None and ("{i}" in think_open) != ("{i}" in think_close):
        raise MergeError(f"parathink: think_open {think_open!r} and think_close {think_close!r} must both number the "
                         'path with "{i}" (ParaThinker: "<think{i}>", "</think{i}>") or neither')
    if summary_prefix is not None and not summary_prefix:
        raise MergeError('parathink: summary_prefix must be a non-empty text (the summary\'s first tokens, "\\n" '
                         "by default)")
    sampling = sampling_params(summary_sampling)
    ex = state.synced(s)
    backend = MergeBackend.of_states([s])
    key = uuid.uuid4().hex  # one routing key: the paths and the summary share a worker's cache
    if think_open is None or summary_prefix is None:
        layout = backend.has_layout(key)
        if think_open is None:
            think_open, think_close = (PATH_OPEN, PATH_CLOSE) if layout else (DEFAULT_OPEN, DEFAULT_CLOSE)
        if summary_prefix is None:
            summary_prefix = SUMMARY_PREFIX["parathinker" if layout and "{i}" in think_open else "plain"]
    prompt_ids = backend.context(ex, key)
    numbered = "{i}" in think_open
    extra = None
    if numbered:  # ParaThinker's <think1> .. </think1>, <think2> ...: path i's own control tokens
        opens = [think_open.format(i=i + 1) for i in range(n)]
        closes = [think_close.format(i=i + 1) for i in range(n)]
        controls = backend.control_ids(key)
        extra = [{"logit_bias": path_logit_bias(controls, i + 1)} for i in range(n)]
        sampling["logit_bias"] = {**(sampling.get("logit_bias") or {}), **summary_logit_bias(controls)}
    else:
        opened = ex.text_.rstrip().endswith(think_open)
        opens, closes = ["" if opened else think_open + "\n"] * n, [think_close] * n
    open_ids = [backend.tokenize(o, key) if o else [] for o in opens]
    close_ids = [backend.tokenize(c, key) for c in closes]
    traces, outcome, launched = backend.think(key, [prompt_ids + o for o in open_ids], k, thinking_budget,
                                              thinking_temperature, list(zip(closes, close_ids)), extra)
    path_ids, texts = [], []
    for trace, i in zip(traces, launched):
        ids, text = list(trace["output_ids"]), trace["text"]
        think_close, close = closes[i], close_ids[i]
        if not text.rstrip().endswith(think_close):  # (a stop text is kept; a stop token is not)
            ids = engine.closed(ids, close)  # closed here where it ran out of budget
            text += think_close
        path_ids.append(open_ids[i] + ids)
        texts.append(opens[i] + text)
    continuation, out = backend.join(key, prompt_ids, path_ids, summary_prefix, sampling, positions)
    state.record(ex, meta={f"{name}_traces": outcome,
                           f"{name}_join": {"prompt_len": len(prompt_ids), "paths": path_ids,
                                            "continuation": continuation, "positions": positions,
                                            "output_ids": out["output_ids"]}},
                 variables={f"{name}_thinking": texts})
    state.append(ex, name, summary_prefix + out["text"], out["meta_info"])
    state.record(ex, variables={name: out["text"]})
    return out["text"]

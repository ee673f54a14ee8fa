"""The `parathink` request field of the OpenAI routes: parallel thinking, then one summary that
reads every path's KV (the KV join), beside `think_merge` and with its conventions.

    {"parathink": {"paths": 4, "first": null, "thinking_budget": 4096, "thinking_temperature": 0.6,
                   "positions": "after_longest", "summary_prefix": null, "layout": "auto"}}

The paths are the think_merge flow's traces (`sgl_merge.serving.think_merge`; `first` summarises
once that many finished and aborts the rest), in one of two layouts:
- "parathinker" (what "auto" picks when the tokenizer has ParaThinker's control tokens): path i is
  the route's prompt + `<think{i}>` (no newline, as in the frontend), closed by `</think{i}>`
  (no other control token is sampled inside it), so a ParaThinker
  checkpoint gives it segment i (`sgl_merge.models.parathinker`); the summary starts with
  `<summary>`;
- "plain" (any thinking model): every path is `<think>` + its thinking + `</think>`, as in the
  frontend's `sgl_merge.parathink`, and the summary starts with a newline, as after `</think>`:
  how to compare the join with think_merge on a model not trained for it.

Each finished path is then kept (`sgl_merge_keep`, a one-token prefill: the trace's KV is in the
radix cache but its closing token), and the route's own generation runs as a join of them: its
input is `summary_prefix` after prompt + path 1 + ... + path P, at positions after the longest path
(`positions`, as in the join).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import secrets
from dataclasses import dataclass
from http import HTTPStatus

from sgl_merge.models.parathinker import find_control_ids, path_logit_bias, summary_logit_bias
from sgl_merge.runtime.join import JOIN_KEY, KEEP_KEY, POSITIONS, busy_pauses, release_rid
from sgl_merge.serving.think_merge import ThinkMergeError, integer_field, last_output, temperature_field

FIELD = "parathink"
DEFAULTS = {"paths": None, "first": None, "thinking_budget": 4096, "thinking_temperature": 0.6,
            "positions": "after_longest", "summary_prefix": None, "layout": "auto"}
LAYOUTS = ("auto", "parathinker", "plain")
SUMMARY_PREFIX = {"parathinker": "<summary>", "plain": "\n"}


@dataclass(frozen=True)
class ParaThinkConfig:
    k: int  # paths launched
    first: int | None = None
    thinking_budget: int = 4096
    thinking_temperature: float = 0.6
    positions: str = "after_longest"
    summary_prefix: str | None = None  # None: the layout's
    layout: str = "auto"
    needs_confidence = False
    method = FIELD

    @property
    def merged(self) -> int:
        """How many paths the summary reads: the first `first` to finish, else all."""
        return self.first or self.k

    def answer(self, original, manager, obj, raw_request, call, traces: list[dict], rids: list[str]):
        """The answer after the paths: a summary joined over their KV."""
        return summarize(original, manager, obj, raw_request, call, traces, rids)


def parse_config(entry, max_group: int | None) -> ParaThinkConfig:
    """The call's config; ThinkMergeError naming the field for anything malformed."""
    if not isinstance(entry, dict):
        raise ThinkMergeError(FIELD, f'{FIELD} must be an object like {{"paths": 4}}, got {type(entry).__name__}')
    unknown = sorted(set(entry) - set(DEFAULTS))
    if unknown:
        raise ThinkMergeError(f"{FIELD}.{unknown[0]}", f"{FIELD} has unknown key(s) {unknown}; allowed: {list(DEFAULTS)}")
    entry = {**DEFAULTS, **{key: value for key, value in entry.items() if value is not None}}
    if entry["paths"] is None:
        raise ThinkMergeError(f"{FIELD}.paths", f"{FIELD}.paths is required: the number of thinking paths")
    paths = integer_field(entry, "paths", 1, None, FIELD)
    if max_group is not None and paths > max_group:
        raise ThinkMergeError(f"{FIELD}.paths", f"{FIELD}.paths is {paths}, but this server runs at most {max_group} "
                              "requests at once (--max-running-requests)")
    first = None if entry["first"] is None else integer_field(entry, "first", 1, paths, FIELD)
    if entry["positions"] not in POSITIONS:
        raise ThinkMergeError(f"{FIELD}.positions",
                              f"{FIELD}.positions must be one of {list(POSITIONS)}, got {entry['positions']!r}")
    prefix = entry["summary_prefix"]
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ThinkMergeError(f"{FIELD}.summary_prefix", f"{FIELD}.summary_prefix must be a non-empty string (the "
                              f"summary's first tokens, prefilled by the join), got {prefix!r}")
    if entry["layout"] not in LAYOUTS:
        raise ThinkMergeError(f"{FIELD}.layout", f"{FIELD}.layout must be one of {list(LAYOUTS)}, got {entry['layout']!r}")
    return ParaThinkConfig(k=paths, first=first, thinking_budget=integer_field(entry, "thinking_budget", 1, None, FIELD),
                           thinking_temperature=temperature_field(entry, FIELD), positions=entry["positions"],
                           summary_prefix=prefix, layout=entry["layout"])


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None


@functools.cache
def _control_ids(tokenizer) -> dict[str, int]:
    """The server tokenizer's control tokens (`find_control_ids`), read once per tokenizer."""
    return find_control_ids(lambda text: _single_token(tokenizer, text))


def path_layout(tokenizer, config: ParaThinkConfig, model_path: str) -> list[tuple[str, int, dict]] | None:
    """ParaThinker's paths for this call, each path's opening text, closing token id and logit bias
    (no other control token sampled inside it, `path_logit_bias`), or None
    for plain `<think>` traces: per `config.layout`, "auto" taking ParaThinker's where the tokenizer
    has `<think1>` and `<summary>` as tokens. A "parathinker" layout the tokenizer cannot give (too
    few numbered paths, or none) is a ThinkMergeError naming `parathink.layout` or `parathink.paths`."""
    if config.layout == "plain" or (config.layout == "auto" and (_single_token(tokenizer, "<think1>") is None
                                                                 or _single_token(tokenizer, "<summary>") is None)):
        return None
    controls = _control_ids(tokenizer)
    paths = []
    for i in range(1, config.k + 1):
        close = _single_token(tokenizer, f"</think{i}>")
        if _single_token(tokenizer, f"<think{i}>") is None or close is None:
            if i == 1 or _single_token(tokenizer, "<summary>") is None:
                raise ThinkMergeError(f"{FIELD}.layout", f'{FIELD}.layout is "parathinker", but the tokenizer of '
                                      f"{model_path} has no <think1> / </think1> / <summary> tokens; use "
                                      '"plain" (or "auto")')
            raise ThinkMergeError(f"{FIELD}.paths", f"{FIELD}.paths is {config.k}, but {model_path} is a ParaThinker "
                                  f"with {i - 1} numbered paths (no <think{i}> token); lower paths, or send "
                                  'layout "plain"')
        paths.append((f"<think{i}>", close, path_logit_bias(controls, i)))
    return paths


async def _keep(original, manager, raw_request, make_request) -> dict | None:
    """Run one keep request; while the kept-KV budget is spent (429), wait and retry (`busy_pauses`):
    the call's client is already waiting for its answer."""
    pauses = busy_pauses()
    while True:
        try:
            return await last_output(original(manager, make_request(), raw_request))
        except Exception as e:  # SGLang raises a non-stream abort as fastapi's HTTPException
            if getattr(e, "status_code", None) != HTTPStatus.TOO_MANY_REQUESTS or (pause := next(pauses, None)) is None:
                raise
        await asyncio.sleep(pause)


def summary_prefix(call) -> str:
    """The summary's first text: the call's, else its layout's."""
    return call.config.summary_prefix or SUMMARY_PREFIX["parathinker" if call.paths else "plain"]


async def summarize(original, manager, obj, raw_request, call, traces: list[dict], rids: list[str]):
    """The route's generation as a join over the finished paths: yields its outputs."""
    from sglang.srt.managers.io_struct import AbortReq, GenerateReqInput

    sources, sent, owner = [], [], secrets.token_urlsafe(18)
    try:
        for trace, launched in zip(traces, call.merged_paths):
            close = call.paths[launched][1] if call.paths else call.close_id
            path = list(trace["output_ids"])
            if not path or path[-1] != close:
                path.append(close)  # ran out of budget: close it
            rid = f"{call.rid}-path-{len(sources)}"
            keep = functools.partial(GenerateReqInput, input_ids=list(trace["prompt_token_ids"]) + path, rid=rid,
                                     lora_path=obj.lora_path, sampling_params={
                                         "max_new_tokens": 0, "custom_params": {KEEP_KEY: {"owner": owner}}})
            rids.append(rid)
            sent.append(rid)  # from here on released however this ends: it may be kept while we wait
            out = await _keep(original, manager, raw_request, keep)
            if out is None or (out["meta_info"].get("finish_reason") or {}).get("type") == "abort":
                raise ValueError(f"{FIELD}: keeping path {len(sources)} for the summary failed: "
                                 f"{out and out['meta_info'].get('finish_reason')}")
            sources.append(rid)
        summary = copy.copy(obj)
        summary.text = None
        summary.input_ids = manager.tokenizer.encode(summary_prefix(call), add_special_tokens=False)
        summary.require_reasoning = False  # the context already holds the thinking
        params = dict(obj.sampling_params or {})
        if call.paths:  # a ParaThinker's summary samples no control token but its own close
            params["logit_bias"] = {**(params.get("logit_bias") or {}),
                                    **summary_logit_bias(_control_ids(manager.tokenizer))}
        params["custom_params"] = {**(params.get("custom_params") or {}), JOIN_KEY: {
            "sources": sources, "owner": owner,
            "prompt_len": len(traces[0]["prompt_token_ids"]) - call.opener_tokens,
            "positions": call.config.positions}}
        summary.sampling_params = params
        async for out in original(manager, summary, raw_request):
            yield out
    finally:
        # Let go of the paths however this ended, also one whose keep is still running (it is then
        # not kept); a source the summary still reads is released when it ends; releasing a
        # released one does nothing. The release follows the keep on the same queue to the scheduler.
        for rid in sent:
            manager._dispatch_to_scheduler(AbortReq(rid=release_rid(owner, rid)))

"""What the server runs for a call with the `parathink` field of the OpenAI routes (the field and
its config: `sgl_merge.contract.think`): parallel thinking, then one summary that reads every
path's KV (the KV join), beside `think_merge` and with its conventions.

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
from http import HTTPStatus

from sgl_merge import traces as engine
from sgl_merge.contract.join import JOIN_KEY, busy_pauses
from sgl_merge.contract.parathink_layout import (PATH_OPEN, SUMMARY_OPEN, SUMMARY_PREFIX, find_control_ids, has_layout,
                                                 summary_logit_bias)
from sgl_merge.contract.think import PARATHINK, ParaThinkConfig, ThinkMergeError
from sgl_merge.runtime.join import release_rid
from sgl_merge.serving.think_merge import last_output


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None


@functools.cache
def _control_ids(tokenizer) -> dict[str, int]:
    """The server tokenizer's control tokens (`find_control_ids`), read once per tokenizer."""
    return find_control_ids(lambda text: _single_token(tokenizer, text))


def path_layout(tokenizer, config: ParaThinkConfig, model_path: str) -> list[engine.Path] | None:
    """ParaThinker's numbered paths for this call (`sgl_merge.traces.numbered_paths`), or None
    for plain `<think>` traces: per `config.layout`, "auto" taking ParaThinker's where the tokenizer
    has `<think1>` and `<summary>` as tokens. A "parathinker" layout the tokenizer cannot give (too
    few numbered paths, or none) is a ThinkMergeError naming `parathink.layout` or `parathink.paths`."""
    single = functools.partial(_single_token, tokenizer)
    if config.layout == "plain" or (config.layout == "auto" and not has_layout(single)):
        return None
    paths = engine.numbered_paths(_control_ids(tokenizer), config.k)
    if not paths or single(SUMMARY_OPEN) is None:
        raise ThinkMergeError(f"{PARATHINK}.layout", f'{PARATHINK}.layout is "parathinker", but the tokenizer '
                              f"of {model_path} has no <think1> / </think1> / <summary> tokens; use "
                              '"plain" (or "auto")')
    if len(paths) < config.k:
        raise ThinkMergeError(f"{PARATHINK}.paths", f"{PARATHINK}.paths is {config.k}, but {model_path} is a "
                              f"ParaThinker with {len(paths)} numbered paths (no {PATH_OPEN.format(i=len(paths) + 1)} "
                              'token); lower paths, or send layout "plain"')
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
            close = call.paths[launched].close_id if call.paths else call.close_id
            path = engine.closed(trace["output_ids"], close)
            rid = f"{call.rid}-path-{len(sources)}"
            keep = functools.partial(GenerateReqInput, input_ids=list(trace["prompt_token_ids"]) + path, rid=rid,
                                     lora_path=obj.lora_path, sampling_params=engine.keep_params(owner))
            rids.append(rid)
            sent.append(rid)  # from here on released however this ends: it may be kept while we wait
            out = await _keep(original, manager, raw_request, keep)
            if out is None or (out["meta_info"].get("finish_reason") or {}).get("type") == "abort":
                raise ValueError(f"{PARATHINK}: keeping path {len(sources)} for the summary failed: "
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
        summary.sampling_params = engine.with_entry(params, JOIN_KEY, engine.join_entry(
            sources, owner, len(traces[0]["prompt_token_ids"]) - call.opener_tokens, call.config.positions))
        async for out in original(manager, summary, raw_request):
            yield out
    finally:
        # Let go of the paths however this ended, also one whose keep is still running (it is then
        # not kept); a source the summary still reads is released when it ends; releasing a
        # released one does nothing. The release follows the keep on the same queue to the scheduler.
        for rid in sent:
            manager._dispatch_to_scheduler(AbortReq(rid=release_rid(owner, rid)))

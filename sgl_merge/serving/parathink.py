"""The `parathink` request field of the OpenAI routes: parallel thinking, then one summary that
reads every path's KV (the KV join), beside `think_merge` and with its conventions.

    {"parathink": {"paths": 4, "first": null, "thinking_budget": 4096, "thinking_temperature": 0.6,
                   "positions": "after_longest", "summary_prefix": "\\n"}}

The paths are the think_merge flow's traces (`sgl_merge.serving.think_merge`: from the route's
prompt opened with `<think>`, closed with `</think>`; `first` summarises once that many finished and
aborts the rest). The `<think>` the flow adds belongs to every path, as in the frontend's
`sgl_merge.parathink`: each path is `<think>` + its thinking + `</think>`. Each finished path is then kept (`sgl_merge_keep`, a one-token prefill: the
trace's KV is in the radix cache but its closing token), and the route's own generation runs as a
join of them: its input is `summary_prefix` after prompt + path 1 + ... + path P, at positions
after the longest path (`positions`, as in the join). It also works with models not trained for it
(plain traces with `</think>` delimiters), which is how to compare it with think_merge.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from sgl_merge.runtime.join import JOIN_KEY, KEEP_KEY, POSITIONS, RELEASE_RID
from sgl_merge.serving.think_merge import ThinkMergeError, _integer, _last, _temperature

FIELD = "parathink"
DEFAULTS = {"paths": None, "first": None, "thinking_budget": 4096, "thinking_temperature": 0.6,
            "positions": "after_longest", "summary_prefix": "\n"}


@dataclass(frozen=True)
class ParaThinkConfig:
    k: int  # paths launched
    first: int | None = None
    thinking_budget: int = 4096
    thinking_temperature: float = 0.6
    positions: str = "after_longest"
    summary_prefix: str = "\n"
    needs_confidence = False

    @property
    def merged(self) -> int:
        """How many paths the summary reads: the first `first` to finish, else all."""
        return self.first or self.k


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
    paths = _integer(entry, "paths", 1, None, FIELD)
    if max_group is not None and paths > max_group:
        raise ThinkMergeError(f"{FIELD}.paths", f"{FIELD}.paths is {paths}, but this server runs at most {max_group} "
                              "requests at once (--max-running-requests)")
    first = None if entry["first"] is None else _integer(entry, "first", 1, paths, FIELD)
    if entry["positions"] not in POSITIONS:
        raise ThinkMergeError(f"{FIELD}.positions",
                              f"{FIELD}.positions must be one of {list(POSITIONS)}, got {entry['positions']!r}")
    prefix = entry["summary_prefix"]
    if not isinstance(prefix, str) or not prefix:
        raise ThinkMergeError(f"{FIELD}.summary_prefix", f"{FIELD}.summary_prefix must be a non-empty string (the "
                              f"summary's first tokens, prefilled by the join), got {prefix!r}")
    return ParaThinkConfig(k=paths, first=first, thinking_budget=_integer(entry, "thinking_budget", 1, None, FIELD),
                           thinking_temperature=_temperature(entry, FIELD), positions=entry["positions"],
                           summary_prefix=prefix)


async def summarize(original, manager, obj, raw_request, call, traces: list[dict], rids: list[str]):
    """The route's generation as a join over the finished paths: yields its outputs."""
    from sglang.srt.managers.io_struct import AbortReq, GenerateReqInput

    sources = []
    try:
        for trace in traces:
            path = list(trace["output_ids"])
            if not path or path[-1] != call.close_id:
                path.append(call.close_id)  # ran out of budget: close it
            rid = f"{call.rid}-path-{len(sources)}"
            keep = GenerateReqInput(input_ids=list(trace["prompt_token_ids"]) + path, rid=rid,
                                    lora_path=obj.lora_path,
                                    sampling_params={"max_new_tokens": 0, "custom_params": {KEEP_KEY: True}})
            rids.append(rid)
            out = await _last(original(manager, keep, raw_request))
            if out is None or (out["meta_info"].get("finish_reason") or {}).get("type") == "abort":
                raise ValueError(f"{FIELD}: keeping path {len(sources)} for the summary failed: "
                                 f"{out and out['meta_info'].get('finish_reason')}")
            sources.append(rid)
        summary = copy.copy(obj)
        summary.text = None
        summary.input_ids = manager.tokenizer.encode(call.config.summary_prefix, add_special_tokens=False)
        summary.require_reasoning = False  # the context already holds the thinking
        params = dict(obj.sampling_params or {})
        params["custom_params"] = {**(params.get("custom_params") or {}), JOIN_KEY: {
            "sources": sources, "prompt_len": len(traces[0]["prompt_token_ids"]) - call.opener_tokens,
            "positions": call.config.positions}}
        summary.sampling_params = params
        async for out in original(manager, summary, raw_request):
            yield out
    finally:
        # Let go of the paths however this ended (a source the summary still reads is released
        # when it finishes; releasing a released one does nothing).
        for rid in sources:
            manager._dispatch_to_scheduler(AbortReq(rid=RELEASE_RID + rid))

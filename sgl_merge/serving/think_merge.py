"""The `think_merge` request field, and the ThinkMerge flow the server runs for one such call.

    {"think_merge": {"k": 4, "mode": "logits", "first": null, "thinking_budget": 4096,
                     "thinking_temperature": 0.6, "weighting": "uniform", "keep": null,
                     "confidence_window": null, "tau": null}}

The flow stands in for the one generation an OpenAI route would run: k thinking traces from the
route's prompt (opened with `<think>` unless the prompt already opens it, closed with `</think>` if
a trace runs out of budget), then the route's own generation as one merge group whose members are
the traces' exact token ids, so the radix cache serves each member's whole context. Its outputs are
the leader's, shaped like the route's single generation, with usage counting every generated token;
SGLang builds the response from them as usual (tool-call parsing, finish reasons, SSE framing).

Beyond uniform averaging: `weighting: "confidence"` weights each member by its trace's confidence
and `keep: n` answers with only the n most confident of the merged traces (both computed here from
the traces' own top logprobs, see `sgl_merge.confidence`; `confidence_window` picks the lowest-window
variant); `mode: "entropy"` (with `tau`) re-weights the members at every answer token on the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

from sgl_merge import confidence
from sgl_merge.runtime.spec import KEY, MODES

FIELD = "think_merge"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DEFAULTS = {"k": None, "mode": "logits", "first": None, "thinking_budget": 4096, "thinking_temperature": 0.6,
            "weighting": "uniform", "keep": None, "confidence_window": None, "tau": None}
WEIGHTINGS = ("uniform", "confidence")


class ThinkMergeError(ValueError):
    """Bad input for a think_merge call: a 400 whose message names the field `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ThinkMergeConfig:
    k: int
    mode: str = "logits"
    first: int | None = None
    thinking_budget: int = 4096
    thinking_temperature: float = 0.6
    weighting: str = "uniform"
    keep: int | None = None
    confidence_window: int | None = None
    tau: float | None = None
    method = FIELD  # the request field this config came from

    @property
    def merged(self) -> int:
        """How many traces finish thinking for the answer: the first `first` of the k, else all k
        (of which `keep`, when given, answer)."""
        return self.first or self.k

    @property
    def needs_confidence(self) -> bool:
        return self.weighting == "confidence" or self.keep is not None

    def answer(self, original, manager, obj, raw_request, call, traces: list[dict], rids: list[str]):
        """The answer after the traces: one merge group over them (`merged_answer`). Each method's
        config answers its own way (parathink's: a summary joined over the paths)."""
        return merged_answer(original, manager, obj, raw_request, call, traces, rids)


def integer_field(entry: dict, name: str, low: int, high: int | None = None, field: str = FIELD) -> int:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ThinkMergeError(f"{field}.{name}", f"{field}.{name} must be an integer {bound}, got {value!r}")
    return value


def temperature_field(entry: dict, field: str = FIELD) -> float:
    value = entry["thinking_temperature"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ThinkMergeError(f"{field}.thinking_temperature",
                              f"{field}.thinking_temperature must be a number >= 0, got {value!r}")
    return float(value)


def parse_config(entry, max_group: int | None) -> ThinkMergeConfig:
    """The call's config; ThinkMergeError naming the field for anything malformed. `max_group` is
    the largest merge group the server can run (its --max-running-requests)."""
    if not isinstance(entry, dict):
        raise ThinkMergeError(FIELD, f'{FIELD} must be an object like {{"k": 4}}, got {type(entry).__name__}')
    unknown = sorted(set(entry) - set(DEFAULTS))
    if unknown:
        raise ThinkMergeError(f"{FIELD}.{unknown[0]}",
                              f"{FIELD} has unknown key(s) {unknown}; allowed: {list(DEFAULTS)}")
    entry = {**DEFAULTS, **{key: value for key, value in entry.items() if value is not None}}
    if entry["k"] is None:
        raise ThinkMergeError(f"{FIELD}.k", f"{FIELD}.k is required: the number of thinking traces")
    k = integer_field(entry, "k", 1)
    if max_group is not None and k > max_group:
        raise ThinkMergeError(f"{FIELD}.k", f"{FIELD}.k is {k}, but this server runs at most {max_group} requests "
                              "at once (--max-running-requests); lower k or restart the server with a larger limit")
    first = None if entry["first"] is None else integer_field(entry, "first", 1, k)
    if entry["mode"] not in MODES:
        raise ThinkMergeError(f"{FIELD}.mode", f"{FIELD}.mode must be one of {list(MODES)}, got {entry['mode']!r}")
    temperature = temperature_field(entry)
    if entry["weighting"] not in WEIGHTINGS:
        raise ThinkMergeError(f"{FIELD}.weighting", f"{FIELD}.weighting must be one of {list(WEIGHTINGS)}, "
                              f"got {entry['weighting']!r}")
    keep = None if entry["keep"] is None else integer_field(entry, "keep", 1, first or k)
    window = None if entry["confidence_window"] is None else integer_field(entry, "confidence_window", 1)
    if window is not None and entry["weighting"] != "confidence" and keep is None:
        raise ThinkMergeError(f"{FIELD}.confidence_window", f"{FIELD}.confidence_window only applies with "
                              'weighting "confidence" or keep')
    tau = entry["tau"]
    if tau is not None:
        if entry["mode"] != "entropy":
            raise ThinkMergeError(f"{FIELD}.tau", f'{FIELD}.tau is the temperature of mode "entropy"; '
                                  f"it has no effect with mode {entry['mode']!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ThinkMergeError(f"{FIELD}.tau", f"{FIELD}.tau must be a positive number, got {tau!r}")
        tau = float(tau)
    return ThinkMergeConfig(k=k, mode=entry["mode"], first=first,
                            thinking_budget=integer_field(entry, "thinking_budget", 1),
                            thinking_temperature=temperature, weighting=entry["weighting"], keep=keep,
                            confidence_window=window, tau=tau)


def think_token_ids(tokenizer) -> tuple[int, int] | None:
    """(open, close) ids of the thinking delimiters, or None for a model that has no such tokens."""
    ids = []
    for token in (THINK_OPEN, THINK_CLOSE):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.decode([token_id]) != token:
            return None
        ids.append(token_id)
    return ids[0], ids[1]


@dataclass
class ThinkMergeCall:
    """One think_merge call: its config and what it has done so far, read by the response."""

    config: ThinkMergeConfig  # or a parathink call's ParaThinkConfig
    rid: str  # the leader's request id; also the merge group's id and the traces' rid prefix
    model: str
    close_id: int
    created: int = field(default_factory=lambda: int(time.time()))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # progress, for streaming
    started: bool = False
    outcomes: list[str] = field(default_factory=list)  # of every launched trace
    thinking_tokens: list[int] = field(default_factory=list)  # generated by every launched trace
    traces: list[str] = field(default_factory=list)  # the merged traces' text, in launch order
    confidences: list[float] = field(default_factory=list)  # of the traces that finished thinking, in order
    dropped: list[int] = field(default_factory=list)  # which of those `keep` left out
    weights: list[float] = field(default_factory=list)  # the members' merge weights
    agreement: list[float | None] = field(default_factory=list)
    opener_tokens: int = 0  # the `<think>` the flow added to the route's prompt (0: it had one)
    # parathink on a ParaThinker: each path's opening text, closing token id and logit bias
    # (`<think{i}>`, `</think{i}>`, other control tokens barred), and which of the launched paths
    # the summary reads; None: plain `<think>` traces
    paths: list[tuple[str, int, dict]] | None = None
    merged_paths: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    answer_tokens: int = 0

    @property
    def method(self) -> str:
        """The field this call came from: "think_merge", or "parathink" (`sgl_merge.serving.parathink`)."""
        return self.config.method

    def summary(self) -> dict:
        """The `sgl_merge` extension field of the response."""
        if self.method == "parathink":
            return {"method": "parathink", "paths": self.config.k, "first": self.config.first,
                    "positions": self.config.positions, "layout": "parathinker" if self.paths else "plain", "trace_outcomes": self.outcomes,
                    "thinking_tokens": self.thinking_tokens, "answer_tokens": self.answer_tokens,
                    "traces": self.traces}
        out = {"k": self.config.k, "first": self.config.first, "mode": self.config.mode,
               "weighting": self.config.weighting, "keep": self.config.keep,
               "trace_outcomes": self.outcomes, "thinking_tokens": self.thinking_tokens,
               "answer_tokens": self.answer_tokens, "agreement": self.agreement, "traces": self.traces,
               "weights": self.weights}
        if self.config.needs_confidence:
            out.update(confidences=self.confidences, dropped=self.dropped)
        return out

    def reasoning_text(self) -> str:
        """All merged traces as one `reasoning_content`, each under its own header."""
        n = len(self.traces)
        return "\n\n".join(f"[trace {i + 1}/{n}]\n{text}" for i, text in enumerate(self.traces))


# ------------------------------------------------------------------ the flow


async def run(original, manager, obj, raw_request, call: ThinkMergeCall):
    """Stands in for `TokenizerManager.generate_request(obj)` of a think_merge or parathink call
    (`original` is SGLang's): the traces, then the config's answer, yielded as the route's one
    generation. On any exit, a client disconnect included, every trace and member still running is
    aborted."""
    rids: list[str] = []
    try:
        traces = await _think(original, manager, obj, raw_request, call, rids)
        async with contextlib.aclosing(call.config.answer(original, manager, obj, raw_request, call, traces,
                                                          rids)) as answer:
            async for out in answer:
                yield _account(out, call)
    finally:
        for rid in rids:
            manager.abort_request(rid)  # a no-op for requests that finished


async def merged_answer(original, manager, obj, raw_request, call: ThinkMergeCall, traces: list[dict],
                        rids: list[str]):
    """The route's generation as one merge group whose members are the traces: yields the leader's
    outputs, with every member's agreement once they finish (in the same step)."""
    members = _members(obj, call, traces)
    rids += [m.rid for m in members]
    followers = [asyncio.ensure_future(last_output(original(manager, m, raw_request))) for m in members[1:]]
    try:
        async for out in original(manager, members[0], raw_request):
            if out["meta_info"].get("finish_reason") is not None:
                rest = await asyncio.gather(*followers)
                call.agreement = [(o["meta_info"].get(KEY) or {}).get("agreement") for o in (out, *rest)]
            yield out
    finally:
        for task in followers:
            task.cancel()


async def last_output(outputs):
    """The last output of a generation's stream."""
    out = None
    async for out in outputs:
        pass
    return out


def _trace_prompt(tokenizer, obj, opening: str = THINK_OPEN + "\n", reopen: bool = False) -> tuple[dict, int]:
    """A trace's prompt: the route's, opened with `opening` (`<think>` and a newline) unless it
    already ends with `<think>` (chat templates that open thinking themselves) and not `reopen`
    (ParaThinker's numbered paths are always opened); and how many tokens the opening added."""
    opener = tokenizer.encode(opening, add_special_tokens=False)
    if obj.input_ids is not None:
        ids = list(obj.input_ids)
        if not reopen and tokenizer.decode(ids[-8:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN):
            return {"input_ids": ids}, 0
        return {"input_ids": ids + opener}, len(opener)
    text = obj.text
    if not reopen and text.rstrip().endswith(THINK_OPEN):
        return {"text": text}, 0
    return {"text": text + opening}, len(opener)


async def _think(original, manager, obj, raw_request, call: ThinkMergeCall, rids: list[str]) -> list[dict]:
    """Launch k traces; return the outputs of the first `merged` to finish, in launch order."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    cfg = call.config
    if call.paths:  # a ParaThinker's paths: path i from the prompt opened with its own <think{i}>
        opened = [_trace_prompt(manager.tokenizer, obj, opening, reopen=True) for opening, _, _ in call.paths]
        prompts = [p for p, _ in opened]
        closes, extra = [close for _, close, _ in call.paths], [{"logit_bias": bias} for _, _, bias in call.paths]
        call.opener_tokens = opened[0][1]  # the same for every path: one "<think{i}>" token
    else:
        prompt, call.opener_tokens = _trace_prompt(manager.tokenizer, obj)
        prompts, closes, extra = [prompt] * cfg.k, [call.close_id] * cfg.k, [{}] * cfg.k
    params = {"max_new_tokens": cfg.thinking_budget, "temperature": cfg.thinking_temperature,
              "skip_special_tokens": False}
    reqs = [GenerateReqInput(**prompts[i], sampling_params={**params, "stop_token_ids": [closes[i]], **extra[i]},
                             rid=f"{call.rid}-think-{i}", return_prompt_token_ids=True, lora_path=obj.lora_path)
            for i in range(cfg.k)]
    rids += [r.rid for r in reqs]
    index = {asyncio.ensure_future(last_output(original(manager, r, raw_request))): i for i, r in enumerate(reqs)}
    call.outcomes = ["aborted"] * cfg.k
    finished: dict[int, dict] = {}
    errors: list[str] = []
    pending = set(index)
    try:
        while pending and len(finished) < cfg.merged:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=index.get):
                i = index[task]
                out = None if task.exception() else task.result()
                if out is None or (out["meta_info"].get("finish_reason") or {}).get("type") == "abort":
                    call.outcomes[i] = "failed"
                    errors.append(str(task.exception() or out["meta_info"]["finish_reason"]))
                elif len(finished) < cfg.merged:
                    finished[i] = out
                    call.outcomes[i] = "merged"
                else:
                    call.outcomes[i] = "finished, unused"
            call.events.put_nowait({"phase": "thinking", "traces_finished": len(finished), "k": cfg.k,
                                    "needed": cfg.merged})
    finally:
        for task in pending:
            manager.abort_request(reqs[index[task]].rid)
        await asyncio.gather(*pending, return_exceptions=True)
    call.thinking_tokens = [_generated(task) for task in index]
    if len(finished) < cfg.merged:
        raise ValueError(f"think_merge: only {len(finished)} of the {cfg.merged} thinking traces needed finished"
                         + (f": {errors[0]}" if errors else ""))
    if call.method == "parathink":
        call.merged_paths = sorted(finished)
        traces = [finished[i] for i in call.merged_paths]
    else:
        traces = await _select(original, manager, obj, raw_request, call, finished, rids)
    call.traces = [t["text"].removesuffix(THINK_CLOSE).strip() for t in traces]
    call.prompt_tokens = traces[0]["meta_info"]["prompt_tokens"]
    call.cached_tokens = traces[0]["meta_info"].get("cached_tokens", 0)
    call.events.put_nowait({"phase": "answering", "thinking_tokens": call.thinking_tokens})
    return traces


async def _select(original, manager, obj, raw_request, call: ThinkMergeCall, finished: dict[int, dict],
                  rids: list[str]) -> list[dict]:
    """The traces that answer, in launch order, and their merge weights: all that finished
    thinking, or with `keep` the most confident of them (the others marked dropped). Confidence
    comes from one scoring request over the traces (`sgl_merge.confidence`)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    cfg = call.config
    order = sorted(finished)
    traces = [finished[i] for i in order]
    scores = [1.0] * len(traces)
    if cfg.needs_confidence:
        ids = [list(t["output_ids"]) for t in traces]
        body = confidence.scoring_request(list(traces[0]["prompt_token_ids"]), ids)
        score_rids = [f"{call.rid}-score-{j}" for j in range(len(ids))]
        rids += score_rids
        outputs = await last_output(original(manager, GenerateReqInput(**body, rid=score_rids, lora_path=obj.lora_path),
                                       raw_request))
        call.confidences = scores = confidence.scored_confidences(outputs, ids, cfg.confidence_window)
        kept = confidence.most_confident(scores, cfg.keep) if cfg.keep else list(range(len(traces)))
        call.dropped = [order[j] for j in range(len(traces)) if j not in kept]
        for i in call.dropped:
            call.outcomes[i] = "dropped, least confident"
        traces, scores = [traces[j] for j in kept], [scores[j] for j in kept]
    call.weights = confidence.merge_weights(scores) if cfg.weighting == "confidence" else [1.0] * len(traces)
    return traces


def _generated(task: asyncio.Future) -> int:
    """Tokens a trace generated, finished or aborted (0 if it failed without an output)."""
    out = None if task.cancelled() or task.exception() else task.result()
    return out["meta_info"].get("completion_tokens", 0) if out else 0


def _members(obj, call: ThinkMergeCall, traces: list[dict]) -> list:
    """The route's generation, once per trace, as one merge group; member 0 (the leader) keeps the
    route's streaming and logprob settings, the others only decode."""
    members = []
    for j, trace in enumerate(traces):
        thought = list(trace["output_ids"])
        if not thought or thought[-1] != call.close_id:
            thought.append(call.close_id)  # ran out of budget: close it, as the frontend does
        member = copy.copy(obj)
        member.text, member.input_ids = None, list(trace["prompt_token_ids"]) + thought
        member.rid = call.rid if j == 0 else f"{call.rid}-member-{j}"
        # The context already holds the whole thinking: with a --reasoning-parser, SGLang would
        # otherwise hold a response_format / tool grammar back until another </think>.
        member.require_reasoning = False
        params = dict(obj.sampling_params or {})
        entry = {"group": call.rid, "size": len(traces), "mode": call.config.mode, "weight": call.weights[j]}
        if call.config.tau is not None:
            entry["tau"] = call.config.tau
        params["custom_params"] = {**(params.get("custom_params") or {}), KEY: entry}
        member.sampling_params = params
        if j:
            member.stream, member.return_logprob, member.top_logprobs_num = False, False, 0
            member.return_prompt_token_ids = False
        members.append(member)
    return members


def _account(out: dict, call: ThinkMergeCall) -> dict:
    """The leader's output with usage for the whole call: the prompt once, every thinking token of
    the merged traces as reasoning, and the answer."""
    meta = dict(out["meta_info"])
    call.answer_tokens = meta.get("completion_tokens", 0)
    thinking = sum(call.thinking_tokens)
    meta.update(prompt_tokens=call.prompt_tokens, cached_tokens=call.cached_tokens,
                completion_tokens=call.answer_tokens + thinking, reasoning_tokens=thinking)
    return {**out, "meta_info": meta}

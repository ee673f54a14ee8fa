"""The research agent: K lines of thought at every step, one merged decision.

Each step of `ResearchAgent.run`:

1. The K branches think on their own (`<think>` ... `</think>`) from the history, sampled in one
   batch after the history is prefilled once (so the radix cache serves it to all K).
2. The branches decide as one. A merge group chooses between `<tool_call>` and `<answer>`; a tool
   call is then a second merge group constrained to the JSON schema of a call to any of the tools
   (`{"name": ..., "arguments": {...}}`), a final answer a merge group up to `</answer>`. The merge
   requests are `merge_gen`'s own (`sgl_merge.traces.merge_body`).
3. The tool runs once; its result joins the history as `<tool_response>`.

The layout is the one Qwen-family research models are trained on (Tongyi DeepResearch, WebSailor,
Qwen3 with tools): ChatML turns, `<think>`, `<tool_call>`, `<tool_response>` in a user turn,
`<answer>`. With `history="shared"` (the default) a step's thinking leaves the context once its
decision is merged, as Qwen3's chat template drops past reasoning: after every step the K branches
hold the same history, every observation is prefilled once, not K times. `history="own"` keeps each
branch's thinking (K diverging histories), for comparison (`scripts/bench_research_history.py`).

With K = 1 every decision is a plain request: the single-agent baseline.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from dataclasses import dataclass, field

from sgl_merge.frontend.merge import MergeError, ServerClient, ensure_merge_server, tokenize
from sgl_merge.research.tools import Toolset
from sgl_merge.traces import merge_body

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# Tongyi DeepResearch's system prompt (Alibaba-NLP/DeepResearch, inference/prompt.py), with the
# tools given to the agent in place of its fixed list.
SYSTEM_PROMPT = (
    "You are a deep research assistant. Your core function is to conduct thorough, multi-source "
    "investigations into any topic. You must handle both broad, open-domain inquiries and queries within "
    "specialized academic fields. For every request, synthesize information from credible, diverse sources "
    "to deliver a comprehensive, accurate, and objective response. When you have gathered sufficient "
    "information and are ready to provide the definitive response, you must enclose the entire final "
    "answer within <answer></answer> tags.\n\n# Tools\n\nYou may call one or more functions to assist with "
    "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n\nCurrent date: {date}')


def render_system(template: str, toolset: Toolset) -> str:
    """The system prompt: `template` with `{tools}` (one JSON definition per line) and `{date}`."""
    tools = "\n".join(json.dumps(d, ensure_ascii=False) for d in toolset.definitions())
    return template.format(tools=tools, date=datetime.date.today().isoformat())


def first_turn(system: str, question: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def response_turn(observation: str) -> str:
    """What follows a tool call's JSON in the history: the call's end, and the tool's response in a
    user turn (Tongyi DeepResearch's layout)."""
    return (f"\n{CALL_CLOSE}<|im_end|>\n<|im_start|>user\n{RESPONSE_OPEN}\n{observation}\n{RESPONSE_CLOSE}"
            "<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class AgentConfig:
    """How the agent thinks and decides. `k` branches per step (1: a single agent); sampling
    `temperature` / `top_p` for thinking and for the merged decisions; `mode` the merge mode."""

    k: int = 4
    max_steps: int = 8
    think_tokens: int = 1024
    call_tokens: int = 256
    answer_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    mode: str = "logits"
    history: str = "shared"  # "shared" | "own"
    system_prompt: str = SYSTEM_PROMPT
    seed: int | None = None  # sampling_seed of every request (reproducible runs)
    min_calls: int = 0  # steps that must call a tool before the agent may answer
    record_ids: bool = False  # keep each decision's contexts and tokens in the trace (for checking)

    def __post_init__(self):
        for name, low in (("k", 1), ("max_steps", 1), ("think_tokens", 1), ("call_tokens", 8),
                          ("answer_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AgentConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.history not in ("shared", "own"):
            raise ValueError(f"AgentConfig.history must be 'shared' or 'own', got {self.history!r}")
        if not self.temperature >= 0:
            raise ValueError(f"AgentConfig.temperature must be >= 0, got {self.temperature!r}")


@dataclass
class Step:
    """One step of a trace, as `trace.json` records it."""

    step: int
    thinking: list[str]  # each branch's thinking
    action: str  # "tool_call" | "answer"
    call: dict | None = None  # {"name", "arguments"} (or {"raw"} if it was not a valid call)
    observation: str = ""
    observation_ok: bool = True
    agreed: int | None = None  # branches whose own top token was the merged one at every step of the decision
    history_tokens: int = 0  # the context the step starts from (the longest branch's, with own histories)
    thinking_tokens: int = 0
    decision_tokens: int = 0
    prompt_tokens: int = 0  # tokens of every request's prompt, summed
    prefilled_tokens: int = 0  # of those, the tokens the server computed (not served by its cache)
    cached_tokens: int = 0
    seconds: float = 0.0
    ids: dict | None = None  # with AgentConfig.record_ids: "contexts" (each branch's, before the decision), "kind", "decision"


@dataclass
class Trace:
    question: str
    k: int
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why the agent stopped without an answer

    def totals(self) -> dict:
        keys = ("thinking_tokens", "decision_tokens", "prompt_tokens", "prefilled_tokens", "cached_tokens")
        return {k: sum(getattr(s, k) for s in self.steps) for k in keys} | {
            "steps": len(self.steps), "tool_calls": sum(s.action == "tool_call" for s in self.steps)}

    def to_json(self) -> dict:
        return {"question": self.question, "k": self.k, "answer": self.answer, "stopped": self.stopped,
                "sources": self.sources,
                "seconds": round(self.seconds, 3), "totals": self.totals(),
                "steps": [vars(s) for s in self.steps]}


def close_step(trace: Trace, step: Step, started: float, on_event) -> bool:
    """Record a finished step (its time, the trace, the "decision" event); True once it answered."""
    step.seconds = round(time.monotonic() - started, 3)
    trace.steps.append(step)
    on_event("decision", {"step": step, "k": trace.k})
    return trace.answer is not None


@dataclass
class _Counts:
    """Token accounting of the requests of one step."""

    prompt: int = 0
    cached: int = 0
    generated: int = 0

    def add(self, items: list[dict]) -> None:
        for item in items:
            meta = item["meta_info"]
            self.prompt += meta["prompt_tokens"]
            self.cached += meta.get("cached_tokens", 0)


class ResearchAgent:
    """Answers questions with `toolset` on the sgl-merge server `server` (a URL or a ServerClient).
    `on_event(kind, data)` (optional) hears each step as it happens: the CLI's live progress."""

    def __init__(self, server: str | ServerClient, toolset: Toolset, config: AgentConfig | None = None,
                 on_event=None):
        self.server = server if isinstance(server, ServerClient) else ServerClient(server.rstrip("/"))
        self.tools = toolset
        self.cfg = config or AgentConfig()
        self.on_event = on_event or (lambda kind, data: None)
        if self.cfg.k > 1:
            ensure_merge_server(self.server.url, self.server.api_key, self.server.verify)
        self._route = uuid.uuid4().hex  # one routing key: a gateway keeps the agent on one worker's cache
        self._ids: dict[str, list[int]] = {}
        self.schema = json.dumps(toolset.call_schema())
        self._close_id = self._single(THINK_CLOSE)
        self.max_input = _max_input(self.server)

    # ------------------------------------------------------------------ server requests

    def _tok(self, text: str) -> list[int]:
        """The server's ids for `text`; short texts (the layout's delimiters) are asked once."""
        if len(text) > 64:
            return tokenize(self.server, text, self._route)
        if text not in self._ids:
            self._ids[text] = tokenize(self.server, text, self._route)
        return self._ids[text]

    def _single(self, text: str) -> int | None:
        ids = self._tok(text)
        return ids[0] if len(ids) == 1 else None

    def _sampling(self, **params) -> dict:
        base = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "skip_special_tokens": False}
        if self.cfg.seed is not None:
            base["sampling_seed"] = self.cfg.seed
        return base | params

    def _generate(self, body: dict, counts: _Counts) -> list[dict]:
        r = self.server.post("/generate", body, route=self._route, timeout=None)
        if r.status_code != 200:
            raise MergeError(f"/generate failed with HTTP {r.status_code}: {r.text[:500]}")
        out = r.json()
        items = out if isinstance(out, list) else [out]
        counts.add(items)
        return items

    def _decide(self, contexts: list[list[int]], counts: _Counts, **sampling) -> list[dict]:
        """One decision of all branches: a merge group over `contexts` (a plain request for K = 1)."""
        params = self._sampling(**sampling)
        if len(contexts) == 1:
            return self._generate({"input_ids": contexts[0], "sampling_params": params}, counts)
        return self._generate(merge_body(contexts, params, mode=self.cfg.mode), counts)

    def _room(self, histories: list[list[int]]) -> int:
        """How many thinking tokens still fit every branch's context, with the decision after them."""
        reserve = len(self._tok(f"{THINK_OPEN}\n")) + len(self._tok(f"\n{THINK_CLOSE}\n\n")) + 16
        return self.max_input - max(map(len, histories)) - reserve

    def _think(self, histories: list[list[int]], budget: int, counts: _Counts) -> list[tuple[list[int], str]]:
        """Each branch's thinking (ids to keep, text to show), from its history. Identical histories are
        prefilled once first, so all K branches read the history from the cache."""
        opening = self._tok(f"{THINK_OPEN}\n")
        prompts = [h + opening for h in histories]
        if len(prompts) > 1 and all(p == prompts[0] for p in prompts):
            self._generate({"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 0}}, counts)
        params = {"max_new_tokens": budget}
        if self._close_id is not None:
            params["stop_token_ids"] = [self._close_id]
        else:
            params["stop"] = [THINK_CLOSE]
        items = self._generate({"input_ids": prompts, "sampling_params": self._sampling(**params)}, counts)
        closing = self._tok(f"\n{THINK_CLOSE}\n\n")
        thoughts = []
        for prompt, item in zip(prompts, items):
            reason = item["meta_info"].get("finish_reason") or {}
            # Without the </think> (or end of turn) that stopped it; a multi-token </think> matched as a
            # stop string is in the ids but not the text.
            ids = self._tok(item["text"]) if isinstance(reason.get("matched"), str) else _written(item)
            counts.generated += len(item["output_ids"])
            thoughts.append((prompt + ids + closing, item["text"].removesuffix(THINK_CLOSE).strip()))
        return thoughts

    # ------------------------------------------------------------------ the loop

    def run(self, question: str) -> Trace:
        """Research `question` until the branches answer or `max_steps` steps have passed (the last
        step must answer)."""
        cfg, started = self.cfg, time.monotonic()
        trace = Trace(question, cfg.k)
        prefix = self._tok(first_turn(render_system(cfg.system_prompt, self.tools), question))
        histories = [prefix] * cfg.k
        for number in range(1, cfg.max_steps + 1):
            t0, counts = time.monotonic(), _Counts()
            room = self._room(histories)
            if room < 1:
                trace.stopped = f"the context ({self.max_input} tokens) is full after {number - 1} step(s)"
                break
            # The last step answers; so does a step after which another would not fit.
            last = number == cfg.max_steps or room < 2 * min(cfg.think_tokens, 64)
            self.on_event("step", {"step": number, "last": last})
            thoughts = self._think(histories, min(cfg.think_tokens, room), counts)
            step = Step(number, [text for _, text in thoughts], "answer", thinking_tokens=counts.generated,
                        history_tokens=max(map(len, histories)))
            contexts = [ids for ids, _ in thoughts]
            choices = [CALL_OPEN + "\n"] * (not last) + [ANSWER_OPEN] * (number > cfg.min_calls or last)
            kind = self._decide(contexts, counts, max_new_tokens=16, regex="|".join(choices))
            contexts = [c + _written(item) for c, item in zip(contexts, kind)]
            if kind[0]["text"].startswith(CALL_OPEN):
                items = self._decide(contexts, counts, max_new_tokens=cfg.call_tokens, json_schema=self.schema)
                step.action = "tool_call"
                self._act(step, items[0], trace)
                response = self._tok(response_turn(step.observation))
                if cfg.history == "shared":  # the step's thinking leaves: one history for all branches
                    histories = [histories[0] + self._tok(f"{CALL_OPEN}\n{items[0]['text']}") + response] * cfg.k
                else:  # each branch keeps its thinking
                    histories = [c + _written(it) + response for c, it in zip(contexts, items)]
            else:
                items = self._decide(contexts, counts, max_new_tokens=cfg.answer_tokens, stop=[ANSWER_CLOSE])
                trace.answer = items[0]["text"].removesuffix(ANSWER_CLOSE).strip()
                step.call = None
            if cfg.record_ids:
                step.ids = {"contexts": [ids for ids, _ in thoughts], "kind": _written(kind[0]),
                            "decision": items[0]["output_ids"]}
            step.agreed = _agreed(kind, items)
            step.decision_tokens = sum(len(i[0]["output_ids"]) for i in (kind, items))
            step.prompt_tokens, step.cached_tokens = counts.prompt, counts.cached
            step.prefilled_tokens = counts.prompt - counts.cached
            if close_step(trace, step, t0, self.on_event):
                break
        trace.seconds = time.monotonic() - started
        return trace

    def _act(self, step: Step, item: dict, trace: Trace) -> None:
        """Run the merged call in `item` (JSON by the call schema unless it was cut off)."""
        step.call = {"raw": item["text"]}
        if item["meta_info"]["finish_reason"]["type"] == "length":
            step.observation = f"The tool call was cut off at {self.cfg.call_tokens} tokens; make a shorter call."
        else:
            try:
                call = json.loads(item["text"], strict=False)  # the grammar lets control characters into strings
                step.call = {"name": call["name"], "arguments": call["arguments"]}
            except (ValueError, KeyError, TypeError):
                step.observation = 'That was not a tool call: give {"name": ..., "arguments": {...}}.'
        if "raw" in step.call:
            step.observation_ok = False
        else:
            run_call(self.tools, step, trace, self.on_event)


def run_call(tools: Toolset, step: Step, trace: Trace, on_event) -> None:
    """Run the step's (valid) call once: its observation into the step, the URLs it saw into the
    trace's sources."""
    on_event("call", {"step": step.step, "call": step.call})
    obs = tools.call(step.call["name"], step.call["arguments"])
    step.observation, step.observation_ok = obs.text, obs.ok
    trace.sources.extend(u for u in obs.sources if u not in trace.sources)


UNKNOWN_CONTEXT = 1 << 40  # a server that does not say: its own limit answers (a 400 naming it)


def _written(item: dict) -> list[int]:
    """The tokens a request wrote, less the stop token that ended it: the end of turn a grammar
    ends with once it is complete, or a stop token id. (They are not part of what follows.)"""
    ids = list(item["output_ids"])
    reason = item["meta_info"].get("finish_reason") or {}
    if reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and ids and ids[-1] == reason["matched"]:
        ids.pop()
    return ids


def _max_input(server: ServerClient) -> int:
    """The longest prompt the server takes (its context length, less what SGLang reserves)."""
    r = server.get("/server_info", timeout=30)
    if r.status_code == 404:  # SGLang's gateway serves only the older name
        r = server.get("/get_server_info", timeout=30)
    r.raise_for_status()
    info = r.json()
    value = info.get("max_req_input_len") if isinstance(info, dict) else None
    return int(value) if value else UNKNOWN_CONTEXT


def _agreed(*decisions: list[dict]) -> int | None:
    """How many branches' own top token was the merged token at every step of the decision (the
    server's per-member agreement); None for a single agent."""
    if len(decisions[0]) == 1:
        return None
    count = 0
    for member in zip(*decisions):
        infos = [item["meta_info"].get("sgl_merge") or {} for item in member]
        count += all(info.get("agreement", 1.0) >= 1.0 for info in infos)
    return count

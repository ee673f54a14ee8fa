"""The research agent for any chat model with tool calling: the model's own chat template and
SGLang's `--tool-call-parser`, through the OpenAI route and its `think_merge` field.

Each step is one `/v1/chat/completions` request with the conversation so far, the tools, and
`think_merge: {"k": K}`: the server runs K thinking traces from the prompt, then the reply as one
merge group over them, and parses a tool call out of it with the server's tool-call parser
(`--tool-call-parser`), exactly as without merging. The history holds the calls and the tools'
responses, never the thinking (the template renders past turns without it), so the K traces of a
step share one prompt in the radix cache. `tool_choice` is "required" while `min_calls` are not
made, "none" on the last step, "auto" in between.

The model needs `<think>` / `</think>` tokens (the field's own requirement); models trained on the
Tongyi / Qwen layout get merged calls constrained to the tools' JSON schema with `ResearchAgent`.
"""

from __future__ import annotations

import json
import re
import time

from sgl_merge.frontend.merge import MergeError, ServerClient
from sgl_merge.research.agent import AgentConfig, Step, Trace, close_step, run_call
from sgl_merge.research.tools import Toolset

CHAT_SYSTEM_PROMPT = (
    "You are a research assistant. Use the tools to find the facts the question needs, one call at a time. "
    "When you know the answer, reply with the final answer within <answer></answer> tags.")


class ChatResearchAgent:
    """`ResearchAgent`'s loop over the OpenAI route (same config, trace and events)."""

    def __init__(self, server: str | ServerClient, toolset: Toolset, config: AgentConfig | None = None,
                 on_event=None):
        self.server = server if isinstance(server, ServerClient) else ServerClient(server.rstrip("/"))
        self.tools = toolset
        self.cfg = config or AgentConfig(system_prompt=CHAT_SYSTEM_PROMPT)
        self.on_event = on_event or (lambda kind, data: None)

    def _complete(self, messages: list[dict], tool_choice: str) -> dict:
        cfg = self.cfg
        body = {"model": "default", "messages": messages, "tools": self.tools.definitions(),
                "tool_choice": tool_choice, "max_tokens": max(cfg.call_tokens, cfg.answer_tokens),
                "temperature": cfg.temperature, "top_p": cfg.top_p,
                "think_merge": {"k": cfg.k, "mode": cfg.mode, "thinking_budget": cfg.think_tokens,
                                "thinking_temperature": cfg.temperature}}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        r = self.server.post("/v1/chat/completions", body, timeout=None)
        if r.status_code != 200:
            raise MergeError(f"/v1/chat/completions failed with HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def run(self, question: str) -> Trace:
        cfg, started = self.cfg, time.monotonic()
        trace = Trace(question, cfg.k)
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]
        for number in range(1, cfg.max_steps + 1):
            t0, last = time.monotonic(), number == cfg.max_steps
            self.on_event("step", {"step": number, "last": last})
            choice = "none" if last else "required" if number <= cfg.min_calls else "auto"
            reply = self._complete(messages, choice)
            step = _step(number, reply)
            message = reply["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            if calls:
                call = calls[0]  # one call per step, as the Tongyi layout makes them
                step.action = "tool_call"
                name, raw = call["function"]["name"], call["function"]["arguments"]
                try:
                    arguments = json.loads(raw)
                except ValueError:
                    arguments = None
                if isinstance(arguments, dict):
                    step.call = {"name": name, "arguments": arguments}
                    run_call(self.tools, step, trace, self.on_event)
                    messages += [{"role": "assistant", "content": message.get("content") or "", "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": call.get("id") or f"call-{number}",
                                  "content": step.observation}]
                else:  # the template cannot render it as a call: the model reads what was wrong instead
                    step.call = {"raw": f"{name} {raw}"}
                    step.observation, step.observation_ok = (f"[{name}] The arguments must be a JSON object, got "
                                                             f"{raw[:200]}."), False
                    messages += [{"role": "assistant", "content": f"{name} {raw}"},
                                 {"role": "user", "content": step.observation}]
            elif choice == "required":  # a call was due, and the parser found none in the reply
                text = message.get("content") or ""
                step.action, step.call, step.observation_ok = "tool_call", {"raw": text}, False
                step.observation = "A tool call was required here, and none could be read from the reply."
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": step.observation}]
            else:
                text = message.get("content") or ""
                answers = re.findall(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.S)
                trace.answer = (answers[-1] if answers else text).strip()
            if close_step(trace, step, t0, self.on_event):
                break
        trace.seconds = time.monotonic() - started
        return trace


def _step(number: int, reply: dict) -> Step:
    """A step's record from the route's reply: the traces, agreement and token counts it reports."""
    ext, usage = reply.get("sgl_merge") or {}, reply.get("usage") or {}
    agreement = [a for a in ext.get("agreement") or [] if a is not None]
    prompt = usage.get("prompt_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Step(number, list(ext.get("traces") or []), "answer",
                agreed=sum(a >= 1.0 for a in agreement) if len(agreement) > 1 else None,
                thinking_tokens=sum(ext.get("thinking_tokens") or []), decision_tokens=ext.get("answer_tokens", 0),
                prompt_tokens=prompt, cached_tokens=cached, prefilled_tokens=prompt - cached)

"""The tool interface the research agent calls: a name, a description, a JSON schema for the
arguments (what the merged tool call is constrained to), and `run(arguments) -> str`.

A tool that fails at run time (a timeout, an HTTP error, a page that is not text, an empty result,
arguments it cannot use) raises `ToolFailure`; the agent turns it into the observation the model
reads, so the agent can try something else. A tool that cannot work at all (an unknown backend, a
missing key, an unreachable server) raises `ToolConfigError` when it is built, before the first
step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class ToolConfigError(ValueError):
    """A tool cannot be set up: the message names the option and the fix."""


class ToolFailure(RuntimeError):
    """A tool call failed in a way the agent can act on (the message is the observation)."""


@dataclass
class Observation:
    """What a tool call gave back: the text the model reads and the URLs it saw or read."""

    text: str
    sources: list[str] = field(default_factory=list)
    ok: bool = True


class Tool:
    """One callable tool. Subclasses set `name`, `description`, `parameters` (a JSON schema object)
    and implement `run`."""

    name: str = ""
    description: str = ""
    parameters: dict = {"type": "object", "properties": {}}

    def run(self, arguments: dict) -> Observation:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of connections and processes (MCP sessions, HTTP clients)."""

    def definition(self) -> dict:
        """The tool as chat templates and the OpenAI API list tools."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class Toolset:
    """The tools one agent may call, by name."""

    def __init__(self, tools: list[Tool]):
        names = [t.name for t in tools]
        if not tools:
            raise ToolConfigError("the agent needs at least one tool")
        if len(set(names)) != len(names):
            raise ToolConfigError(f"two tools share a name: {names}; give each tool its own name")
        self.tools = {t.name: t for t in tools}

    def definitions(self) -> list[dict]:
        return [t.definition() for t in self.tools.values()]

    def call_schema(self) -> dict:
        """The JSON schema of one call, `{"name": <tool>, "arguments": {...}}`, for any tool here:
        the constraint of the merged tool call."""
        calls = [{"type": "object",
                  "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in self.tools.values()]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def call(self, name: str, arguments) -> Observation:
        """Run one call; every failure becomes an observation that says what went wrong."""
        tool = self.tools.get(name)
        if tool is None:
            return Observation(f"[{name}] There is no tool {name!r}; the tools are {sorted(self.tools)}.", ok=False)
        if not isinstance(arguments, dict):
            return Observation(f"[{name}] The arguments must be a JSON object, got {json.dumps(arguments)[:200]}.",
                               ok=False)
        try:
            return tool.run(arguments)
        except ToolFailure as e:
            return Observation(f"[{name}] {e}", ok=False)

    def close(self) -> None:
        for t in self.tools.values():
            t.close()

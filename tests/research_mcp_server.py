"""A small MCP stdio server for tests/test_research_tools.py: a lookup tool, one that fails, one
that is slow, and one that says the server's process id (to check that close() ends it).
`--no-tools` starts a server that offers none, `--tools a,b` one that offers only those; `--http PORT` serves streamable HTTP on
127.0.0.1:PORT/mcp instead of stdio."""

import os
import sys

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FACTS = {"jostedalsbreen": "Jostedalsbreen is the largest glacier in continental Europe."}

server = MCPServer("research-test")
# `--tools a,b`: offer only these tools (an agent test that must not call the slow one)
ONLY = sys.argv[sys.argv.index("--tools") + 1].split(",") if "--tools" in sys.argv else None


def tool(fn):
    return fn if ONLY is not None and fn.__name__ not in ONLY else server.tool()(fn)


@tool
def lookup(term: str) -> str:
    """Look a term up in a tiny encyclopedia."""
    return FACTS.get(term.lower(), f"no entry for {term}")


@tool
def explode(reason: str) -> str:
    """Always fails, with the reason given (a ToolError's text reaches the client)."""
    raise ToolError(f"exploded: {reason}")


@tool
async def wait(seconds: float) -> str:
    """Answers after the given number of seconds."""
    await anyio.sleep(seconds)
    return "done"


@tool
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


if __name__ == "__main__":
    if "--no-tools" in sys.argv:
        server = MCPServer("research-test-empty")
    if "--http" in sys.argv:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[sys.argv.index("--http") + 1]))
    else:
        server.run("stdio")

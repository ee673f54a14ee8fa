"""A small MCP stdio server for tests/test_research_tools.py: a lookup tool, one that fails, one
that is slow, and one that says the server's process id (to check that close() ends it).
`--no-tools` starts a server that offers none; `--http PORT` serves streamable HTTP on
127.0.0.1:PORT/mcp instead of stdio."""

import os
import sys

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FACTS = {"jostedalsbreen": "Jostedalsbreen is the largest glacier in continental Europe."}

server = MCPServer("research-test")


@server.tool()
def lookup(term: str) -> str:
    """Look a term up in a tiny encyclopedia."""
    return FACTS.get(term.lower(), f"no entry for {term}")


@server.tool()
def explode(reason: str) -> str:
    """Always fails, with the reason given (a ToolError's text reaches the client)."""
    raise ToolError(f"exploded: {reason}")


@server.tool()
async def wait(seconds: float) -> str:
    """Answers after the given number of seconds."""
    await anyio.sleep(seconds)
    return "done"


@server.tool()
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

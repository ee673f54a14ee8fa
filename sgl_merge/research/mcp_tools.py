"""Tools from MCP servers: any Model Context Protocol server's tools become the agent's tools.

`connect_mcp` takes what a user would type: an `http(s)://` URL (the streamable HTTP transport) or
the command line of a stdio server. The `mcp` SDK is async and the agent is not, so each server
gets one event loop in a daemon thread: one long-lived task there holds the session open (the
SDK's task groups must be entered and left by the same task), and each tool call is a coroutine
sent into that loop and waited for with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import shlex
import shutil
import sys
import threading

import anyio
import mcp
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from sgl_merge.research.tools import Observation, Tool, ToolConfigError, ToolFailure

# Seconds close() waits for the session to end; the SDK's own shutdown of a stdio server (close its
# stdin, wait 2 s, SIGTERM, wait 2 s, SIGKILL) fits in it.
CLOSE_TIMEOUT_S = 10.0


class McpServer:
    """One connected MCP server: its tools, and `close()` to end the session (and the server's
    process, for a stdio server)."""

    def __init__(self, spec: str, *, timeout_s: float = 30):
        transport = _transport(spec)  # before anything that would need closing
        self.spec = spec
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp {spec}", daemon=True)
        self._closing = asyncio.Event()
        self._connected: concurrent.futures.Future[list[mcp.types.Tool]] = concurrent.futures.Future()
        self._client: mcp.Client | None = None
        self._thread.start()
        self._session = asyncio.run_coroutine_threadsafe(self._hold_session(transport), self._loop)
        self._tools = self._wait_connected()

    def tools(self) -> list[Tool]:
        """One agent tool per tool the server listed when it connected."""
        return [McpTool(self, t) for t in self._tools]

    def call(self, name: str, arguments: dict) -> Observation:
        """Run one of the server's tools; its error results, timeouts and a lost connection are
        `ToolFailure`s."""
        if self._loop.is_closed():
            raise ToolFailure(f"the connection to the MCP server {self.spec!r} is closed")
        call = asyncio.run_coroutine_threadsafe(
            self._client.call_tool(name, arguments, read_timeout_seconds=self.timeout_s), self._loop)
        try:
            # A little beyond the SDK's own read timeout, so the SDK's error (which names it) comes first.
            result = call.result(timeout=self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            call.cancel()
            raise ToolFailure(f"{name} did not answer within {self.timeout_s:g} s; try again or other arguments")
        except (MCPError, anyio.ClosedResourceError, anyio.BrokenResourceError) as e:
            raise ToolFailure(f"{name} failed: {e or type(e).__name__}") from None
        text = _result_text(result)
        if result.is_error:
            raise ToolFailure(text or f"{name} failed without saying why")
        return Observation(text)

    def close(self) -> None:
        """End the session, wait for the transport to shut down (a stdio server's process exits or
        is killed), and stop the event loop; calling it again does nothing."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._closing.set)
        concurrent.futures.wait([self._session], timeout=CLOSE_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
        self._loop.close()

    async def _hold_session(self, transport) -> None:
        """Connect and list the tools within the timeout, then keep the session open until close().
        The deadline is a cancel scope around the whole session, lifted once connected: the SDK's
        task groups must be left in the order they were entered, so no narrower scope will do."""
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + self.timeout_s) as connecting:
                async with mcp.Client(transport, read_timeout_seconds=self.timeout_s) as client:
                    tools = await _list_tools(client)
                    connecting.deadline = math.inf
                    self._client = client
                    self._connected.set_result(tools)
                    await self._closing.wait()
            if connecting.cancelled_caught:
                raise TimeoutError(f"it did not answer within {self.timeout_s:g} s")
        except BaseException as e:
            if not self._connected.done():
                self._connected.set_exception(e)
            raise

    def _wait_connected(self) -> list[mcp.types.Tool]:
        """The server's tools, once connected; a failure closes what was started and becomes a
        `ToolConfigError` naming the spec."""
        try:
            # The session's own deadline ends a hung connect; this wait only outlasts its shutdown.
            tools = self._connected.result(timeout=self.timeout_s + CLOSE_TIMEOUT_S)
        except BaseException as e:
            self.close()
            raise ToolConfigError(f"could not connect to the MCP server {self.spec!r}: {_reason(e)}") from None
        if not tools:
            self.close()
            raise ToolConfigError(f"the MCP server {self.spec!r} offers no tools; connect a server that has some")
        return tools


class McpTool(Tool):
    """One tool of an MCP server, as the agent sees it: the server's name, description and input
    schema."""

    def __init__(self, server: McpServer, tool: mcp.types.Tool):
        self.server = server
        self.name = tool.name
        self.description = tool.description or tool.title or tool.name
        self.parameters = tool.input_schema

    def run(self, arguments: dict) -> Observation:
        return self.server.call(self.name, arguments)


def connect_mcp(spec: str, *, timeout_s: float = 30) -> McpServer:
    """Connect to an MCP server: `http(s)://...` for streamable HTTP, else a command line that
    starts a stdio server (`python my_server.py --flag`, split as a shell would)."""
    return McpServer(spec, timeout_s=timeout_s)


def _transport(spec: str):
    """What `mcp.Client` connects to: the URL, or the stdio transport that starts the server."""
    if spec.startswith(("http://", "https://")):
        return spec
    argv = shlex.split(spec)
    if not argv:
        raise ToolConfigError("the MCP server spec is empty; pass a URL or a command line such as "
                              "'python my_server.py'")
    if shutil.which(argv[0]) is None:
        raise ToolConfigError(f"cannot start the MCP server {spec!r}: the command {argv[0]!r} was not found")
    # The whole environment, not the SDK's short safe list: servers read their API keys from it. The
    # server's log goes to this process's own stderr (fd 2), whatever sys.stderr has been swapped for.
    params = mcp.StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ))
    return stdio_client(params, errlog=sys.__stderr__)


async def _list_tools(client: mcp.Client) -> list[mcp.types.Tool]:
    tools, cursor = [], None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            return tools


def _reason(error: BaseException) -> str:
    """The innermost cause of a failed connect (the SDK wraps causes in exception groups)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    if isinstance(error, TimeoutError):
        return str(error) or "it did not answer in time"
    return f"{type(error).__name__}: {error}"


def _result_text(result: mcp.types.CallToolResult) -> str:
    """The text of a tool result; other content is named, not inlined, and structured content
    stands in when there is no text."""
    parts = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


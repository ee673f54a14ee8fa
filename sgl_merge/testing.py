"""The test harness: `ServeProcess` runs `sgl-merge serve` for a test and leaves no process
behind; the small models (`sgl_merge.tiny_models`) and `free_port` are here too, for tests of your own.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from sgl_merge.server import ServerProcess, free_port
from sgl_merge.tiny_models import build_tiny_model, build_tiny_parathinker

__all__ = ["ServeProcess", "build_tiny_model", "build_tiny_parathinker", "free_port"]

# The line `sgl-merge serve` prints once its server reports sgl-merge active (`server.describe`).
READY = re.compile(r"sgl-merge \S+ active .* listening on (http://\S+)")


class ServeProcess(ServerProcess):
    """`sgl-merge serve ARGV` as a child process, for tests, started and stopped as the command
    starts and stops its own server (`ServerProcess`): ready once the command says its server is
    ready with sgl-merge active, which is what a user sees; on exit SIGTERMed, and whatever is left
    of any process group it saw (the command's, the server's) SIGKILLed even when the test failed,
    and reported where the test passed. Should the test process die without exiting the block (even
    by SIGKILL), the command gets SIGTERM from Linux (`sgl_merge.server.spawn`) and stops its
    server. `command` replaces `python -m sgl_merge.cli serve` (the arguments follow)."""

    what, slow_hint, hint_lines = "sgl-merge serve", "", 40

    def __init__(self, argv: list[str], log_path: str | Path, timeout: float = 180.0,
                 env: dict[str, str] | None = None, command: list[str] | None = None):
        super().__init__(argv=argv, log_path=Path(log_path), env={**os.environ, **(env or {})},
                         command=command or [sys.executable, "-m", "sgl_merge.cli", "serve"])
        self.timeout = timeout

    def __enter__(self) -> "ServeProcess":
        self.log_path.write_bytes(b"")  # readiness is read from this log: no earlier run's line counts
        return self.start(self.timeout)

    def __exit__(self, exc_type, *_) -> None:
        # The command's own stop waits up to 20 s for its server and as long for the server's group.
        left = self.stop(grace=60)
        if left and exc_type is None:
            raise RuntimeError(f"sgl-merge serve left {len(left)} processes running after SIGTERM: {left} (killed now)")

    def _ready(self, require_plugin: bool) -> bool:
        m = READY.search(self.log())
        if m:
            self.url = m.group(1)
        return m is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

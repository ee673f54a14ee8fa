"""The test harness: `ServeProcess` runs `sgl-merge serve` for a test and leaves no process
behind; the small models (`sgl_merge.tiny_models`) and `free_port` are here too, for tests of your own.
"""

from __future__ import annotations

from pathlib import Path

from sgl_merge.server import free_port
from sgl_merge.tiny_models import build_tiny_model, build_tiny_parathinker

__all__ = ["ServeProcess", "build_tiny_model", "build_tiny_parathinker", "free_port"]


class ServeProcess:
    """`sgl-merge serve ARGV` as a child process, for tests: waits until it reports the server
    ready with sgl-merge active, and on exit SIGTERMs it and makes sure every process of the server
    (launcher, scheduler, detokenizer) is gone, even when the test failed: whatever is left of any
    process group it saw (the command's, the server's) is SIGKILLed, and reported where the test
    passed. Should the test process die without exiting the block (even by SIGKILL), the command
    gets SIGTERM from Linux (`sgl_merge.server.spawn`) and stops its server. `command` replaces
    `python -m sgl_merge.cli serve` (the arguments follow)."""

    def __init__(self, argv: list[str], log_path: str | Path, timeout: float = 180.0,
                 env: dict[str, str] | None = None, command: list[str] | None = None):
        import sys

        self.argv, self.log_path, self.timeout = argv, Path(log_path), timeout
        self.env = env
        self.command = command or [sys.executable, "-m", "sgl_merge.cli", "serve"]
        self.proc = None
        self.url = ""
        self.groups: set[int] = set()

    def __enter__(self) -> "ServeProcess":
        import os
        import re
        import time

        from sgl_merge.server import spawn

        try:
            with open(self.log_path, "wb") as log:
                self.proc = spawn([*self.command, *self.argv], stdout=log, stderr=log,
                                  env={**os.environ, **(self.env or {})})
            self.groups.add(self.proc.pid)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                m = re.search(r"sgl-merge \S+ active .* listening on (http://\S+)", self.log())
                if m:
                    self.url = m.group(1)
                    self._note_groups()
                    return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sgl-merge serve exited {self.proc.returncode}:\n{self.tail()}")
                time.sleep(0.5)
            raise TimeoutError(f"sgl-merge serve not ready after {self.timeout:.0f} s:\n{self.tail()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def processes(self) -> list:
        """The live processes of this server: the launcher and all its descendants."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def _note_groups(self) -> None:
        """Remember the process groups of the command and its descendants (the server's own)."""
        import os

        for p in self.processes():
            try:
                self.groups.add(os.getpgid(p.pid))
            except OSError:
                pass
        self.groups.discard(os.getpgrp())  # never this (the test's) own group

    def __exit__(self, *exc) -> None:
        import signal
        import subprocess

        import psutil

        from sgl_merge.server import group_members, kill_group

        if self.proc is None:
            return
        tree = self.processes()
        self._note_groups()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(tree, timeout=30)
        left = sorted({p.pid for p in alive} | {pid for g in self.groups for pid in group_members(g)})
        for pgid in self.groups:
            kill_group(pgid)
        for p in alive:  # (one that left its group)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self.proc = None
        if left and exc[0] is None:
            raise RuntimeError(
                f"sgl-merge serve left {len(left)} processes running after SIGTERM: {left} (killed now)"
            )

"""Run generated code against its tests in a separate, limited Python process.

Used by `sgl-merge eval --task code` and `programs/write_code.py`. The child runs isolated (`python -I`)
with an address-space limit and a CPU-time limit, and a wall-clock timeout covers sleeping code.

The verdict does not trust the child's exit status: a fixed harness (`_HARNESS`) runs the answer,
then the tests, each in `exec` with every exception caught (SystemExit included), and only after
the tests have run does it write a fresh random token to a pipe of its own. An answer that exits
early (`sys.exit(0)`, `os._exit(0)`, `quit()`), raises, or swallows the tests' run therefore fails.
What this does not isolate: the child is an ordinary process of this user (files, network and
other processes are reachable), and code written to attack the harness (reading the token from the
interpreter's frames, or returning objects whose `__eq__` is always true) is not defended against.
Run untrusted models' code in a container or VM.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass

# The child: code and tests arrive as JSON on stdin (generated text may hold bytes an argv cannot,
# NUL); the token goes to the pipe whose fd is argv[1], and only once the tests have passed.
_HARNESS = r"""
import json, os, sys, traceback
def _run():
    job = json.loads(sys.stdin.read())
    fd, token = int(sys.argv[1]), job.pop("token")
    scope = {"__name__": "__main__"}
    for part in ("code", "tests"):
        try:
            exec(compile(job[part], f"<{part}>", "exec"), scope)
        except SystemExit as e:
            sys.stderr.write(f"the {part} exited before the tests finished (SystemExit: {e})\n")
            os._exit(1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    os.write(fd, token.encode())
    os._exit(0)
_run()
"""


@dataclass
class Verdict:
    passed: bool
    reason: str  # "passed", "failed: <last line>", "timeout", "memory limit"


def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python)?\n(.*?)```", text or "", flags=re.S)
    return blocks[-1] if blocks else (text or "")


def run_tests(code: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Run `code` then `tests` in a fresh, isolated Python process limited to `timeout_s` of wall
    time (CPU time too) and `memory_mb` of address space; passed only if the tests ran to the end."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    token = secrets.token_hex(16)
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _HARNESS, str(write_end)],
                              input=json.dumps({"code": code, "tests": tests, "token": token}),
                              capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              preexec_fn=limit, pass_fds=(write_end,))
    except subprocess.TimeoutExpired:
        return Verdict(False, "timeout")
    finally:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            reported = pipe.read(len(token) + 1).decode(errors="replace")
    if proc.returncode == 0 and reported == token:
        return Verdict(True, "passed")
    if proc.returncode == -signal.SIGXCPU:
        return Verdict(False, "timeout")
    if "MemoryError" in proc.stderr or proc.returncode == -signal.SIGKILL:
        return Verdict(False, "memory limit")
    err = proc.stderr.strip().splitlines()
    if err:
        return Verdict(False, f"failed: {err[-1]}")
    return Verdict(False, f"failed: the process exited (code {proc.returncode}) before the tests finished")

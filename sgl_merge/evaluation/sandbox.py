"""Run generated code against its tests in a separate, limited Python process.

Used by `sgl-merge eval --task code` and `programs/code.py`: the code and the tests go on the
child's stdin (generated text may hold bytes an argv cannot), the child runs isolated (`python -I`)
with an address-space limit and a CPU-time limit, and a wall-clock timeout covers sleeping code.
"""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Verdict:
    passed: bool
    reason: str  # "passed", "failed: <last line>", "timeout", "memory limit"


def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python)?\n(.*?)```", text or "", flags=re.S)
    return blocks[-1] if blocks else (text or "")


def run_tests(code: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Run `code` then `tests` in a fresh, isolated Python process limited to `timeout_s` of wall
    time (CPU time too) and `memory_mb` of address space."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    try:
        # The program goes on stdin: generated text may hold bytes an argv cannot (NUL).
        proc = subprocess.run([sys.executable, "-I", "-"], input=code + "\n\n" + tests, capture_output=True,
                              text=True, errors="replace", timeout=timeout_s, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return Verdict(False, "timeout")
    if proc.returncode == 0:
        return Verdict(True, "passed")
    if proc.returncode == -signal.SIGXCPU:
        return Verdict(False, "timeout")
    if "MemoryError" in proc.stderr or proc.returncode == -signal.SIGKILL:
        return Verdict(False, "memory limit")
    err = proc.stderr.strip().splitlines()
    return Verdict(False, f"failed: {err[-1] if err else f'exit code {proc.returncode}'}")

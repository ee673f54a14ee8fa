"""CPU engine support: what a CPU-only machine needs for SGLang 0.5.23 to run at all.

SGLang's CPU engine imports a few `sgl_kernel.*_cpu` functions, but the `sgl_kernel` wheel is
CUDA-only. When it cannot load, the spawned server processes get sgl-merge's torch stand-in
(`stand_in/sgl_kernel`) first on PYTHONPATH. On a machine where the real package loads, nothing is
changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STAND_IN_DIR = Path(__file__).resolve().parent / "stand_in"


def real_sgl_kernel_loads(env: dict[str, str] | None = None) -> bool:
    """Whether the real `sgl_kernel` imports, checked in a child so a failure leaves no trace here."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = _without_stand_in(env.get("PYTHONPATH", ""))
    probe = subprocess.run(
        [sys.executable, "-c", "import sgl_kernel"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
    )
    return probe.returncode == 0


def _without_stand_in(pythonpath: str) -> str:
    return os.pathsep.join(p for p in pythonpath.split(os.pathsep) if p and Path(p) != STAND_IN_DIR)


THREADS_BIND = "SGLANG_CPU_OMP_THREADS_BIND"


def threads_bind(ranks: int, cpus: list[int]) -> str:
    """SGLang's per-rank core list ("0-3|4-7") giving `ranks` ranks equal contiguous shares of `cpus`.

    Without it SGLang's CPU engine puts one rank per NUMA node and refuses more ranks than nodes,
    so `--dp-size 2` fails on a one-node laptop."""
    if ranks > len(cpus):
        raise ValueError(f"{ranks} ranks (dp_size * tp_size * pp_size) need at least {ranks} CPU cores, "
                         f"this machine gives {len(cpus)}; use fewer ranks or set {THREADS_BIND} yourself")
    share, parts = len(cpus) // ranks, []
    for r in range(ranks):
        mine = cpus[r * share:(r + 1) * share]
        parts.append(f"{mine[0]}-{mine[-1]}" if len(mine) > 1 else str(mine[0]))
    return "|".join(parts)


def cpu_engine_env(env: dict[str, str], ranks: int = 1) -> dict[str, str]:
    """Environment additions for a CPU-engine SGLang server of `ranks` scheduler ranks launched with `env`."""
    extra = {}
    if "SGLANG_USE_CPU_ENGINE" not in env:
        extra["SGLANG_USE_CPU_ENGINE"] = "1"
    if ranks > 1 and THREADS_BIND not in env:
        extra[THREADS_BIND] = threads_bind(ranks, sorted(os.sched_getaffinity(0)))
    if not real_sgl_kernel_loads(env):
        rest = _without_stand_in(env.get("PYTHONPATH", ""))
        extra["PYTHONPATH"] = os.pathsep.join(p for p in (str(STAND_IN_DIR), rest) if p)
    return extra

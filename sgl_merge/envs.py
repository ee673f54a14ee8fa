"""Settings read from the environment, in SGLang's `SGLANG_` namespace: SGLang rewrites every
legacy `SGL_*` variable to `SGLANG_*` (with a warning that names the new spelling), so that is the
spelling users end up setting."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("sgl_merge")


def seconds(name: str, default: float) -> float:
    """`$name` as a number of seconds; `default` when unset, or (logged) when not a number."""
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        logger.error("%s=%r is not a number of seconds; using %s", name, raw, default)
        return default


def count(name: str, default: int) -> int:
    """`$name` as a whole number >= 0; `default` when unset, or (logged) when not one."""
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if value < 0:
        logger.error("%s=%r is not a whole number >= 0; using %s", name, raw, default)
        return default
    return value


def flag(name: str) -> bool:
    """`$name` as an on/off switch: on for 1 / true / yes (any case), off when unset or anything else."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

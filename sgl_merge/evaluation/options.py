"""What the evaluation commands share: the --k option, the settings check that guards resuming,
and the message of an interrupted run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sgl_merge.evaluation.runner import EvalError


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes integers like 2,4,8, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def check_config(out: Path, settings: dict, dataset: str) -> None:
    """Record the settings of the results in `out` (concurrency aside); refuse to resume results made
    with other settings."""
    settings = {"dataset": dataset, **settings}
    settings.pop("concurrency", None)
    settings = json.loads(json.dumps(settings))  # as stored (tuples become lists)
    path = out / "config.json"
    if path.exists() and (out / "results.jsonl").exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise EvalError(f"{out} holds results made with other settings ({', '.join(changed)} differ); "
                            "pass a new --out, or delete that folder to start over")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def interrupted(command: str, out: Path) -> int:
    # eval writes one results file; the demo one per task folder
    files = [out / "results.jsonl"] if (out / "results.jsonl").exists() else sorted(out.glob("*/results.jsonl"))
    saved = sum(len(f.read_text().splitlines()) for f in files)
    where = files[0] if len(files) == 1 else out
    print(f"\n{command}: interrupted; {saved} problem runs are saved in {where}. "
          "Run the same command again to resume.", file=sys.stderr)
    return 130

"""What the programs share: their command line, JSONL input, and the results table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(description: str, default_data: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="http://127.0.0.1:30000", help="an SGLang server started with sgl-merge serve")
    p.add_argument("--k", type=int, default=4, help="number of branches (traces) per problem")
    if default_data is not None:
        p.add_argument("--data", default=default_data, help="JSONL file of problems")
        p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    return p


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return rows[:limit]


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'method':<12} {'score':>8} {'answer tokens':>14}")
    for method, r in rows.items():
        print(f"{method:<12} {r['score']:>8.3f} {r['tokens']:>14d}")


def answer_tokens(state, name: str = "answer") -> int:
    """Tokens generated for the `name` variable: one request's, or every merge member's."""
    metas = state.get_meta_info(name)
    metas = metas if isinstance(metas, list) else [metas]
    return sum((m or {}).get("completion_tokens", 0) for m in metas)

"""What the benchmark scripts share: their command line (an existing server, or one they start) and
the synthetic prompts they send."""

from __future__ import annotations

import argparse

SMALL_RANDOM_MODEL = "a small random model"
TINY_REASONER = "the bundled tiny reasoner"


def parser(description: str, model: str = SMALL_RANDOM_MODEL, rounds: int | None = 5) -> argparse.ArgumentParser:
    """`--url` (else a CPU server is started), `--model-path` for it (default: `model`), and
    `--rounds` of paired measurements when `rounds` is given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an existing sgl-merge server (default: start a CPU one)")
    p.add_argument("--model-path", help=f"model for the started server (default: {model})")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help="paired rounds, alternating which side goes first")
    return p


def contexts(n: int, length: int) -> list[list[int]]:
    """n distinct prompts of `length` token ids (ids below 256 exist in any byte-level vocab)."""
    return [[(7 * i + 13 * j) % 200 + 32 for j in range(length)] for i in range(n)]

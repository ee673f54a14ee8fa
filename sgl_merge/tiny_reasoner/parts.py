"""The tiny reasoner's open-ended task: four independent chains answered together as one line.

    Mod 10. A=7: 1:+5 2:+3 3:-4. B=2: 1:*3 2:+9 3:-1. C=4: 1:-6 2:*7 3:+2. D=0: 1:+8 2:-3 3:*9. Final values?

The model thinks one line per operation, chain by chain, then answers all four at once:

    <think>
    A1:7+5=2
    A2:2+3=5
    ...
    D3:5*9=5
    </think>
    \\boxed{1,5,8,5}

Why this task: the answer has several independent parts and is scored whole (exact match of the
line). A trace's answer is right only if all four chains are; a whole-answer majority vote needs
several traces that agree on everything, while a merged answer is decoded token by token, so at
each part the traces that got that part right can outvote the ones that did not, even when no
single trace is right everywhere. Whether that helps is measured, not assumed (`sgl-merge demo`).
Vote and scoring need no parser beyond the last `\\boxed{}`: the answer's text is compared as is.

It reuses the arithmetic of `task` (the same bijective operations and the same uncertainty on each
line's result digit), so one model is trained on both tasks, and the chains are short (3 steps)
so a trace stays near 100 tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

from sgl_merge.evaluation.scoring import correct
from sgl_merge.tiny_reasoner import task

PARTS = "ABCD"
STEPS = 3
HELDOUT = Path(__file__).resolve().parent / "heldout_parts.jsonl"
HELDOUT_SEED = 2_000_003
HELDOUT_SIZE = 200


def make_problem(rng: random.Random) -> dict:
    """One problem from `rng`: {"question", "thinking", "answer"} (all str); the answer is the
    four final values, comma-separated, in chain order."""
    chains, lines, finals = [], [], []
    for label in PARTS:
        x0 = rng.randrange(task.MODULUS)
        ops, chain_lines, x = task.draw_chain(rng, x0, STEPS, label)
        chains.append(f"{label}={x0}: {' '.join(ops)}.")
        lines += chain_lines
        finals.append(str(x))
    question = f"Mod {task.MODULUS}. {' '.join(chains)} Final values?"
    return {"question": question, "thinking": "\n".join(lines), "answer": ",".join(finals)}


def make_heldout() -> list[dict]:
    """The shipped held-out set of this task (disjoint from training, as for `task`)."""
    return task.make_heldout(make_problem, HELDOUT_SEED, HELDOUT_SIZE)


def is_correct(text: str, answer: str) -> bool:
    """Exact match of the whole answer (the evaluation's "exact" task, spaces ignored)."""
    return correct("exact", text, {"answer": answer})

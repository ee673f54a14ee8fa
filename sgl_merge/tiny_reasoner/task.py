"""The tiny reasoner's task: a chain of modular arithmetic steps, worked out inside `<think>`.

A problem gives a start digit and 5 to 7 numbered operations, all mod 10:

    Start at 7. Mod 10: 1:+5 2:+3 3:-4 4:*3 5:+9. Final value?

and the model thinks one line per operation before it answers:

    <think>
    1:7+5=2
    2:2+3=5
    3:5-4=1
    4:1*3=3
    5:3+9=2
    </think>
    \\boxed{2}

Why this task: the answer depends on every intermediate line, so a mistake anywhere in the chain
carries to the end; and every operation is a bijection of the digits (adds, subtracts, and
multiplies only by 3, 7 or 9, the units coprime to 10), so a wrong intermediate digit always
gives a wrong final digit (unless a later mistake cancels it) and different mistakes land on
different wrong answers. The numbered operations let a small model find "the k-th step" by
content (the index) rather than by counting, so its errors come from the arithmetic, which it is
trained to be uncertain about (see `scripts/train_tiny_reasoner.py`), not from losing its place.
That is what makes a vote over parallel traces (and ThinkMerge) beat a single trace.

Thinking traces are short (about 7 tokens a line, 35 to 50 tokens in all), so a CPU demo can run
hundreds of problems with several traces each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sgl_merge.contract.parathink_layout import (PATH_CLOSE, PATH_OPEN, SUMMARY_CLOSE, SUMMARY_OPEN, THINK_CLOSE,
                                                 THINK_OPEN)
from sgl_merge.evaluation.scoring import last_boxed

MODULUS = 10
MIN_STEPS = 5
MAX_STEPS = 7
# Multipliers coprime to the modulus, so multiplication never merges two wrong values into one.
MULTIPLIERS = (3, 7, 9)

_HERE = Path(__file__).resolve().parent
MODEL_DIR = _HERE / "model"
HELDOUT = _HERE / "heldout.jsonl"

# Seeds: training draws its stream from TRAIN_SEED and skips every held-out question.
TRAIN_SEED = 0
HELDOUT_SEED = 1_000_003
HELDOUT_SIZE = 300


def apply_op(x: int, op: str, b: int) -> int:
    """`x op b` mod 10 (op one of + - *)."""
    if op == "+":
        return (x + b) % MODULUS
    if op == "-":
        return (x - b) % MODULUS
    return (x * b) % MODULUS


def make_problem(rng: random.Random) -> dict:
    """One problem from `rng`: {"question", "thinking", "answer"} (all str).

    Operations are + and - of 1..9 and * of 3, 7 or 9, in proportion 4:4:2 so multiplication
    (the hardest table) shows up in most chains without dominating them.
    """
    x0 = rng.randrange(MODULUS)
    ops, lines, x = draw_chain(rng, x0, rng.randint(MIN_STEPS, MAX_STEPS))
    question = f"Start at {x0}. Mod {MODULUS}: {' '.join(ops)}. Final value?"
    return {"question": question, "thinking": "\n".join(lines), "answer": str(x)}


def draw_chain(rng: random.Random, x0: int, n: int, label: str = "") -> tuple[list[str], list[str], int]:
    """`n` operations from `rng` applied to `x0`: the question's operations ("1:+5"), the
    thinking lines ("1:7+5=2", each prefixed with `label`) and the final value."""
    ops, lines, x = [], [], x0
    for k in range(1, n + 1):
        r = rng.random()
        if r < 0.4:
            op, b = "+", rng.randint(1, 9)
        elif r < 0.8:
            op, b = "-", rng.randint(1, 9)
        else:
            op, b = "*", rng.choice(MULTIPLIERS)
        y = apply_op(x, op, b)
        ops.append(f"{k}:{op}{b}")
        lines.append(f"{label}{k}:{x}{op}{b}={y}")
        x = y
    return ops, lines, x


def make_dataset(n: int, seed: int, make=None) -> list[dict]:
    """`n` problems drawn from `random.Random(seed)` by `make` (default: this task's
    `make_problem`): the same list for the same arguments."""
    rng = random.Random(seed)
    make = make or make_problem
    return [make(rng) for _ in range(n)]


def make_heldout(make=None, seed: int = HELDOUT_SEED, size: int = HELDOUT_SIZE) -> list[dict]:
    """The shipped held-out set: `size` distinct problems from `seed` (by `make`, default this
    task's `make_problem`).

    Training skips every question in it (see the training script), so the two are disjoint.
    """
    rng = random.Random(seed)
    make = make or make_problem
    seen: set[str] = set()
    out = []
    while len(out) < size:
        p = make(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def load_heldout(path: str | Path = HELDOUT) -> list[dict]:
    """The held-out problems as a list of {"question", "answer"} dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_messages(question: str) -> list[dict]:
    """Chat messages for the model's chat template: just the question as a user turn.

    The template does not open `<think>`; the model writes `<think>\\n` itself, as it was trained.
    """
    return [{"role": "user", "content": question}]


def prompt_text(question: str) -> str:
    """The prompt the chat template renders (with add_generation_prompt), as a plain string."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def completion_text(problem: dict) -> str:
    """The assistant's target text: thinking, then the boxed answer right after `</think>`."""
    return f"{THINK_OPEN}\n{problem['thinking']}\n{THINK_CLOSE}\n\\boxed{{{problem['answer']}}}<|im_end|>"


def training_text(problem: dict) -> str:
    """The exact text the model is trained on: prompt followed by completion."""
    return prompt_text(problem["question"]) + completion_text(problem)


def path_text(i: int, thinking: str) -> str:
    """Path i (from 1) in ParaThinker's layout, which the bundled model also answers in (prompt,
    then `<think1>`..`</think1>`, `<think2>`.., then the summary): its control tokens around the
    thinking lines (`sgl_merge.contract.parathink_layout`); `sgl_merge.models.parathinker` reads a
    token's segment from them."""
    return f"{PATH_OPEN.format(i=i)}\n{thinking}\n{PATH_CLOSE.format(i=i)}"


def summary_text(answer: str) -> str:
    """The summary after the paths: what a ParaThinker answers with."""
    return f"{SUMMARY_OPEN}\\boxed{{{answer}}}{SUMMARY_CLOSE}<|im_end|>"


def extract_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (stripped), or None if there is none:
    the evaluation's own reading of an answer, so training-time checks and the demo agree."""
    return last_boxed(text)


def is_correct(text: str, answer: str) -> bool:
    """Whether the last boxed answer in `text` equals `answer` (as integers when both parse)."""
    got = extract_answer(text)
    if got is None:
        return False
    try:
        return int(got) == int(str(answer).strip())
    except ValueError:
        return got == str(answer).strip()

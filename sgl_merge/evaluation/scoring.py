"""Is an answer right, and which answers count as the same for a vote.

Math answers are compared with `math-verify` (the last `\\boxed{...}` of the answer, parsed and
checked for mathematical equivalence with the reference: `1/2` = `0.5` = `\\frac{1}{2}`); exact
answers are the last boxed text itself, compared whole (spaces ignored: `3,8, 0` = `3,8,0`), for
answers of several parts where any parser would be task-specific; code answers run against the
problem's tests in the sandbox.
"""

from __future__ import annotations

import logging
import re

from sgl_merge.evaluation.sandbox import extract_code, run_tests

TASKS = ("math", "exact", "code")
_BOXED = re.compile(r"\\boxed\{")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text or "")]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


def math_correct(answer_text: str, reference: str) -> bool:
    """Whether the answer's last boxed expression equals the reference, by math-verify."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its one-time "no timeout" warning
    got = last_boxed(answer_text)
    if got is None:
        return False
    # No signal-based timeouts: answers are scored in worker threads, where signal.alarm cannot run.
    gold = parse(f"${reference}$", parsing_timeout=None)
    return bool(gold) and bool(verify(gold, parse(f"${got}$", parsing_timeout=None), timeout_seconds=None))


def vote_key(task: str, answer_text: str) -> str | None:
    """What a majority vote counts: the boxed answer (math) or the code with blank lines and
    trailing spaces dropped (code); None when the answer has nothing to count."""
    if task == "math":
        return last_boxed(answer_text)
    if task == "exact":
        return exact_answer(answer_text)
    code = extract_code(answer_text)
    lines = [line.rstrip() for line in code.splitlines() if line.strip()]
    return "\n".join(lines) or None


def exact_answer(answer_text: str) -> str | None:
    """The last boxed text with its spaces removed: what an exact answer is compared (and voted) by."""
    got = last_boxed(answer_text)
    return None if got is None else got.replace(" ", "")


def correct(task: str, answer_text: str, problem: dict, timeout_s: float = 10.0) -> bool:
    if task == "math":
        return math_correct(answer_text, str(problem["answer"]))
    if task == "exact":
        return exact_answer(answer_text) == str(problem["answer"]).replace(" ", "")
    return run_tests(extract_code(answer_text), problem["tests"], timeout_s=timeout_s).passed

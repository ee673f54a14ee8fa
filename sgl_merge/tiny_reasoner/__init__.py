"""A tiny bundled reasoning model for the ThinkMerge demo, and the synthetic task it solves.

`task` defines the problems (chained modular arithmetic thought out inside `<think>`), the exact
training text, answer extraction and scoring; `parts` the open-ended second task (four chains
answered together as one line, scored whole); `MODEL_DIR` is the shipped Qwen2 model directory,
trained on both by `scripts/train_tiny_reasoner.py`, and `HELDOUT` / `parts.HELDOUT` the shipped
held-out problems.
"""

from .task import (
    HELDOUT,
    MODEL_DIR,
    extract_answer,
    is_correct,
    load_heldout,
    make_dataset,
    make_problem,
    prompt_messages,
)

__all__ = [
    "HELDOUT",
    "MODEL_DIR",
    "extract_answer",
    "is_correct",
    "load_heldout",
    "make_dataset",
    "make_problem",
    "prompt_messages",
]

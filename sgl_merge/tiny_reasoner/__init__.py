"""A tiny bundled reasoning model for the ThinkMerge demo, and the synthetic task it solves.

`task` defines the problems (chained modular arithmetic thought out inside `<think>`), the exact
training text, answer extraction and scoring; `MODEL_DIR` is the shipped Qwen2 model directory
(trained by `scripts/train_tiny_reasoner.py`) and `HELDOUT` the shipped held-out problems.
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

"""ParaThinker's layout (arXiv 2509.04475): the control tokens a checkpoint's tokenizer has, how a
request is laid out with them, and how a tokenizer is recognised as having them.

A path is `<think{i}>` (i from 1, no newline after it) + its thinking + `</think{i}>`; the summary
starts with `<summary>` and ends with `</summary>`; each stage may sample no other stage's control
token (`path_logit_bias`, `summary_logit_bias`). A tokenizer has the layout when `<think1>` and
`<summary>` are single tokens (`has_layout`); elsewhere the paths are plain `<think>` ... `</think>`
traces and the summary starts with a newline (`SUMMARY_PREFIX`). The model side (segment ids
from these tokens) is `sgl_merge.models.parathinker`.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PATH_OPEN = "<think{i}>"  # path i's opening, i from 1 (`.format(i=...)`)
PATH_CLOSE = "</think{i}>"
SUMMARY_OPEN = "<summary>"
SUMMARY_CLOSE = "</summary>"
SUMMARY_PREFIX = {"parathinker": SUMMARY_OPEN, "plain": "\n"}  # a summary's first text, per layout
DEFAULT_MAX_SEGMENTS = 32  # the authors' default: segment 0 (prompt, summary) and up to 31 paths
STRAY_BIAS = -1e4  # logit bias that keeps a control token out of a stage


def control_tokens(max_paths: int) -> dict[str, int]:
    """Control token text -> the segment it is in (`<thinkN>` also puts what follows it there,
    `<summary>` puts the rest of the sequence in segment 0; `</thinkN>` only itself, see
    `opens_segment`)."""
    tokens = {SUMMARY_OPEN: 0}
    for n in range(1, max_paths + 1):
        tokens[PATH_OPEN.format(i=n)] = n
        tokens[PATH_CLOSE.format(i=n)] = n
    return tokens


def opens_segment(text: str) -> bool:
    """Whether a control token sets the segment of the tokens after it (not a `</thinkN>`)."""
    return not text.startswith("</")


def has_layout(single) -> bool:
    """Whether a tokenizer has ParaThinker's layout: `<think1>` and `<summary>` are single tokens.
    `single(text)`: the id of `text` where it is one token, else None (a tokenizer, or a server's
    /tokenize)."""
    return single(PATH_OPEN.format(i=1)) is not None and single(SUMMARY_OPEN) is not None


def find_control_ids(single) -> dict[str, int]:
    """The control tokens a tokenizer has, text -> id: `<summary>`, `</summary>`, plain `<think>` /
    `</think>` and `<thinkN>` / `</thinkN>` for N = 1, 2, ... while both exist. `single(text)`: the
    id of `text` where it is one token, else None (a tokenizer, or a server's /tokenize)."""
    ids = {text: i for text in (SUMMARY_OPEN, SUMMARY_CLOSE, THINK_OPEN, THINK_CLOSE)
           if (i := single(text)) is not None}
    for n in range(1, DEFAULT_MAX_SEGMENTS + 1):
        pair = {text: single(text) for text in (PATH_OPEN.format(i=n), PATH_CLOSE.format(i=n))}
        if None in pair.values():
            break
        ids.update(pair)
    return ids


def path_ids(control_ids: dict[str, int], path: int) -> tuple[int, int] | None:
    """The ids of path `path`'s (from 1) `<think{path}>` and `</think{path}>`, None where the
    tokenizer's control tokens (`find_control_ids`) have no such path."""
    opening, closing = PATH_OPEN.format(i=path), PATH_CLOSE.format(i=path)
    if opening not in control_ids or closing not in control_ids:
        return None
    return control_ids[opening], control_ids[closing]


def path_logit_bias(control_ids: dict[str, int], path: int) -> dict[str, float]:
    """SGLang `logit_bias` for sampling path `path` (from 1): every control token but the path's own
    `</think{path}>` made unsampleable, plain `<think>` / `</think>` included. A stray `</think5>`
    or `<summary>` sampled inside path 7 (the control tokens' embeddings sit close together in a
    small model) puts the path off the layout its summary was trained on; the authors' vLLM rewrites
    such tokens, this never samples them. `control_ids`: control token text -> id, for those the
    tokenizer has (`find_control_ids`)."""
    return stage_logit_bias(control_ids, PATH_CLOSE.format(i=path))


def summary_logit_bias(control_ids: dict[str, int]) -> dict[str, float]:
    """SGLang `logit_bias` for sampling a summary: no control token but `</summary>` (a `<think3>`
    in a summary opens no path; it is segment 0 like the rest of the summary, but off the layout)."""
    return stage_logit_bias(control_ids, SUMMARY_CLOSE)


def stage_logit_bias(control_ids: dict[str, int], allowed: str) -> dict[str, float]:
    """Every control token but `allowed` made unsampleable."""
    return {str(i): STRAY_BIAS for text, i in control_ids.items() if text != allowed}

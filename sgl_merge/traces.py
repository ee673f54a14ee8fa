"""The trace engine: what every thinking method does with its traces, written once and free of I/O.

Three drivers run it, each with its own transport: the server's OpenAI fields
(`sgl_merge.serving.think_merge`, asynchronously inside the tokenizer manager), the frontend
(`sgl_merge.frontend`, threads over HTTP) and the evaluation runner (`sgl_merge.evaluation.runner`,
batched /generate calls). They send the requests built here and report back what came of them:

- the traces: `thinking_params` (how a trace samples and where it stops), `TraceSet` (n launched,
  the first k that finish thinking used, the rest aborted, and what became of each), `closed` (a
  trace closed where it ran out of budget), and the two layouts a method's traces take: plain
  `<think>` ... `</think>` traces, or a ParaThinker's numbered paths (`numbered_paths`);
- one strategy per method for the answer after them:
  - merge (`think_merge`): `choose` the traces that answer and their weights (all of them, or by
    DeepConf confidence), then one merge group over their contexts (`member_entry`, `merge_body`);
  - parathink: keep each path (`keep_params`), then one join that reads them all (`join_entry`);
  - the research agent's steps (`sgl_merge.research.agent`) send `merge_body` groups of their own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sgl_merge import confidence
from sgl_merge.contract.join import KEEP_KEY
from sgl_merge.contract.merge import KEY
from sgl_merge.contract.parathink_layout import PATH_CLOSE, PATH_OPEN, path_ids, path_logit_bias
from sgl_merge.contract.think import needs_confidence

# What became of a launched trace.
USED = "merged"  # among the first k that finished thinking: it answers
UNUSED = "finished, unused"  # finished after the first k
ABORTED = "aborted"  # still thinking when the first k had finished
FAILED = "failed"  # ended with an error
DROPPED = "dropped, least confident"  # finished among the first k, left out by `keep`


# ------------------------------------------------------------------ the traces


def thinking_params(budget: int, temperature: float, close_ids: list[int], close_text: str | None = None) -> dict:
    """A trace's sampling parameters: at most `budget` tokens at `temperature`, stopping at its
    closing delimiter: a stop token where `close_ids` is one token, else the text `close_text`,
    kept in the trace like a stop token."""
    params = {"max_new_tokens": budget, "temperature": temperature, "skip_special_tokens": False}
    if len(close_ids) == 1:
        params["stop_token_ids"] = list(close_ids)
    else:
        params.update(stop=[close_text], no_stop_trim=True)
    return params


def closed(ids: list[int], close_ids: list[int] | int) -> list[int]:
    """A generated trace with its closing delimiter: appended where the budget ran out first."""
    close = [close_ids] if isinstance(close_ids, int) else list(close_ids)
    ids = list(ids)
    return ids if ids[len(ids) - len(close):] == close else ids + close


@dataclass
class TraceSet:
    """n launched traces, of which the first `needed` to finish thinking are used. A driver reports
    each trace as it ends (`finish`), stops waiting once `enough`, aborts the rest, and reads the
    used traces (`used`: launch indices in the order they finished) and every trace's outcome."""

    n: int
    needed: int
    outcomes: list[str] = field(init=False)
    results: dict[int, dict] = field(default_factory=dict)  # launch index -> last output of a used trace
    order: list[int] = field(default_factory=list)  # used traces, in the order they finished
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.outcomes = [ABORTED] * self.n

    def finish(self, i: int, result: dict | None, error: BaseException | str | None = None) -> None:
        """Trace `i` ended with `result` (its last output). Finished thinking: used, or unused when
        enough finished first. Ended by an abort once enough had finished: aborted as no longer
        needed. Else (an `error`, no result, an abort before that) it failed."""
        if error is None and result is not None and not aborted(result):
            self.outcomes[i] = UNUSED if self.enough else USED
            if not self.enough:
                self.results[i] = result
                self.order.append(i)
        elif error is None and result is not None and self.enough:
            self.outcomes[i] = ABORTED
        else:
            self.outcomes[i] = FAILED
            self.errors.append(str(error if error is not None else result and finish_reason(result)))

    @property
    def enough(self) -> bool:
        return len(self.order) >= self.needed

    @property
    def used(self) -> list[int]:
        return list(self.order)

    def shortfall(self, what: str) -> str | None:
        """Why the call cannot go on (too few traces finished thinking), or None."""
        if self.enough:
            return None
        return (f"only {len(self.order)} of the {self.needed} {what} needed finished"
                + (f": {self.errors[0]}" if self.errors else ""))


def finish_reason(output: dict) -> dict:
    return (output.get("meta_info") or {}).get("finish_reason") or {}


def aborted(output: dict) -> bool:
    """Whether an output ended by an abort (or carries an error): its trace did not finish thinking."""
    return "error" in output or finish_reason(output).get("type") == "abort"


@dataclass(frozen=True)
class Path:
    """ParaThinker's path i (from 1): `<think{i}>` opens it (no newline after it), `</think{i}>`
    closes it, and no other control token is sampled inside it (`logit_bias`)."""

    opening: str
    open_id: int
    closing: str
    close_id: int
    logit_bias: dict


def numbered_paths(control_ids: dict[str, int], n: int) -> list[Path]:
    """Paths 1..n where the tokenizer's control tokens (`find_control_ids`) have them: fewer than n
    when the checkpoint has fewer numbered paths (each driver says so in its own error)."""
    paths = []
    for i in range(1, n + 1):
        ids = path_ids(control_ids, i)
        if ids is None:
            break
        paths.append(Path(PATH_OPEN.format(i=i), ids[0], PATH_CLOSE.format(i=i), ids[1],
                          path_logit_bias(control_ids, i)))
    return paths


# ------------------------------------------------------------------ merge: the answer as one merge group


@dataclass(frozen=True)
class Choice:
    """Which of the finished traces answer (positions among them, in order) and their merge weights."""

    kept: list[int]
    weights: list[float]
    confidences: list[float] | None = None  # of every finished trace, where scored

    def dropped(self, n: int) -> list[int]:
        return [j for j in range(n) if j not in self.kept]


def choose(n: int, weighting: str = "uniform", keep: int | None = None,
           confidences: list[float] | None = None) -> Choice:
    """The traces that answer, of `n` that finished thinking: all, or with `keep` the most confident;
    weighted uniformly, or with `weighting` "confidence" by confidence (DeepConf: `confidences` from
    one scoring request, `sgl_merge.confidence`, needed where `needs_confidence`)."""
    if not needs_confidence(weighting, keep):
        return Choice(list(range(n)), [1.0] * n)
    kept = confidence.most_confident(confidences, keep) if keep else list(range(n))
    weights = (confidence.merge_weights([confidences[j] for j in kept]) if weighting == "confidence"
               else [1.0] * len(kept))
    return Choice(kept, weights, list(confidences))


def member_entry(group: str, size: int, mode: str = "logits", weight: float | None = None,
                 tau: float | None = None) -> dict:
    """One member's `sgl_merge` entry (`sgl_merge.contract.merge`)."""
    entry = {"group": group, "size": size, "mode": mode}
    if weight is not None:
        entry["weight"] = weight
    if tau is not None:
        entry["tau"] = tau
    return entry


def with_entry(sampling_params: dict | None, key: str, entry) -> dict:
    """`sampling_params` with `entry` under `custom_params[key]` (the other custom params kept)."""
    params = dict(sampling_params or {})
    params["custom_params"] = {**(params.get("custom_params") or {}), key: entry}
    return params


def merge_body(contexts: list[list[int]], sampling_params: dict, *, mode: str = "logits",
               weights: list[float] | None = None, tau: float | None = None) -> dict:
    """The /generate body of one merge group over `contexts` (token ids): one request with one shared
    sampling_params, the shape SGLang's gateway sends whole to one worker."""
    entry = member_entry(uuid.uuid4().hex, len(contexts), mode, tau=tau)
    if weights is not None:
        entry["weights"] = list(weights)
    return {"input_ids": contexts, "sampling_params": with_entry(sampling_params, KEY, entry)}


# ------------------------------------------------------------------ parathink: the answer as a join


def keep_params(owner: str, ttl_s: float | None = None) -> dict:
    """The sampling parameters of a keep: a one-token prefill whose KV stays for a join."""
    keep = {"owner": owner} if ttl_s is None else {"ttl_s": ttl_s, "owner": owner}
    return {"max_new_tokens": 0, "custom_params": {KEEP_KEY: keep}}


def join_entry(sources: list[str], owner: str, prompt_len: int, positions: str = "after_longest",
               release_sources: bool = True) -> dict:
    """The `sgl_merge_join` entry of an answer that reads the kept `sources` (`sgl_merge.contract.join`)."""
    return {"sources": list(sources), "owner": owner, "prompt_len": prompt_len, "positions": positions,
            "release_sources": release_sources}

"""The program state that sgl-merge's calls read and write: SGLang's StreamExecutor, written here as
SGLang's interpreter writes a `gen`'s result, and nowhere else in the frontend.

Besides SGLang's own fields (text, variables, meta_info), a state carries two of sgl-merge's: the
token ids known to spell its text (what the server generated, so that the radix cache serves a
whole branch instead of a re-tokenized one) and the routing key its `think_merge` call used (so
that its merge goes to the same worker behind SGLang's gateway).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class _Known:
    """Token ids known to spell exactly `text` (what the server generated)."""

    text: str
    ids: list[int] = field(default_factory=list)


def synced(s):
    """The executor of state `s`, once every operation queued on it has run."""
    executor = s.stream_executor
    executor.sync()
    return executor


def known(executor) -> tuple[list[int] | None, str]:
    """The token ids known to spell the start of the executor's text and the text after them; None
    and the whole text where none are known."""
    k: _Known | None = getattr(executor, "_sgl_merge_known", None)
    if k is not None and executor.text_.startswith(k.text):
        return k.ids, executor.text_[len(k.text):]
    return None, executor.text_


def route(executors) -> str:
    """The forks' routing key: the one their think_merge call used, else a new one."""
    return next((k for ex in executors if (k := getattr(ex, "_sgl_merge_route", None))), uuid.uuid4().hex)


def append(executor, name: str, text: str, meta: dict, ids: list[int] | None = None) -> None:
    """Write a finished generation into a synced executor, as the interpreter would; `ids`, when
    given, are the exact token ids of the executor's whole new text."""
    executor.text_ += text
    executor.variables[name] = text
    executor.meta_info[name] = meta
    if name in executor.variable_event:
        executor.variable_event[name].set()
    if ids is not None:
        executor._sgl_merge_known = _Known(executor.text_, ids)


def append_merged(executors, name: str, out: list[dict], contexts: list[list[int]]) -> str:
    """Append the merged answer of a merge group's response items `out` (one per fork, in order) to
    every fork, each with its own meta_info and ids; return its text."""
    text = out[0]["text"]
    for ex, item, ctx in zip(executors, out, contexts):
        append(ex, name, text, item["meta_info"], ctx + item["output_ids"])
    return text


def record(executor, meta: dict | None = None, variables: dict | None = None) -> None:
    """Set meta_info and variables of the executor (a call's extra results: traces, joins)."""
    executor.meta_info.update(meta or {})
    executor.variables.update(variables or {})


def branch(s, name: str, key: str, traces: list[tuple[str, dict, list[int]]]):
    """One fork of `s` per trace (text, meta_info, the ids of the fork's whole text), the trace
    appended as `name`, each fork routed with `key`."""
    forks = s.fork(len(traces))
    for fork, (text, meta, ids) in zip(forks, traces):
        fork.stream_executor._sgl_merge_route = key
        append(synced(fork), name, text, meta, ids)
    return forks


def merged(s, name: str, answer: str, forks, thinking: list[str]) -> None:
    """After think_merge's merge over `forks`: the traces' texts and each member's meta_info in `s`,
    the forks ended (as join() would), and the answer appended to `s`."""
    ex = s.stream_executor
    ex.variables[f"{name}_thinking"] = thinking
    ex.meta_info[name] = [f.stream_executor.meta_info[name] for f in forks]  # one per member
    for f in forks:  # the forks' worker threads are done; end them now, as join() would
        f.stream_executor.end()
    s += answer
    ex.sync()
    ex.variables[name] = answer

"""ThinkMerge in SGLang programs: `merge_gen` over forks, the `think_merge` pattern, and `vote`.

Used inside `@sgl.function` programs running on a `RuntimeEndpoint` whose server has sgl-merge:

    forks = s.fork(4)
    forks += sgl.gen("thinking", max_tokens=2048, stop="</think>", temperature=0.6)
    answer = sgl_merge.merge_gen(forks, "answer", max_tokens=512, temperature=0.6)

`merge_gen` sends one /generate whose members are the forks' contexts as token ids, with one shared
sampling_params, and writes the one merged answer into every fork. Forks made by `think_merge`
carry the exact ids the server generated (so the radix cache serves each whole branch); other
contexts are tokenized by the server first.

As in `sglang.lang.api`, a call here checks its arguments and calls the backend, which sends every
request (`backend.MergeBackend`: the API key, the routing key, SGLang's gateway); what it returns is
written into the program state by `state`. The backend's transport and errors are re-exported
here (`ServerClient`, `MergeError`, `APIKeyError`, ...), where other modules import them from.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from collections import Counter

from sgl_merge import traces as engine
from sgl_merge.contract.parathink_layout import THINK_CLOSE, THINK_OPEN
from sgl_merge.contract.think import needs_confidence
from sgl_merge.frontend import state
from sgl_merge.frontend.backend import (ROUTING_HEADER, APIKeyError, MergeBackend, MergeError, ServerClient,
                                        api_key_message)

__all__ = ["APIKeyError", "DEFAULT_CLOSE", "DEFAULT_OPEN", "MergeError", "ROUTING_HEADER", "ServerClient",
           "api_key_message", "ensure_merge_server", "majority", "merge_gen", "merge_gen_stream", "sampling_params",
           "think_merge", "tokenize", "trace_counts", "vote"]

DEFAULT_OPEN, DEFAULT_CLOSE = THINK_OPEN, THINK_CLOSE  # a trace's delimiters, unless a call gives its own
SAMPLING_ARGS = ("max_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                 "frequency_penalty", "presence_penalty", "ignore_eos", "regex", "json_schema")


def ensure_merge_server(url: str, api_key: str | None = None, verify: str | None = None) -> None:
    """Check once per URL, key and verification that the server runs sgl-merge, so a plain server
    fails clearly (and a server that wants another API key says so: APIKeyError)."""
    MergeBackend.of(ServerClient(url.rstrip("/"), api_key, verify)).ensure()


def tokenize(server: ServerClient, text: str, key: str, add_special_tokens: bool = False) -> list[int]:
    """The server's token ids for `text` (`MergeBackend.tokenize`), `key` the routing key."""
    return MergeBackend.of(server).tokenize(text, key, add_special_tokens)


def sampling_params(kwargs: dict) -> dict:
    """The server's sampling_params for `sgl.gen`'s sampling arguments (an unknown one: TypeError)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_ARGS))
    if unknown:
        raise TypeError(f"unexpected sampling argument(s) {unknown}; allowed: {list(SAMPLING_ARGS)}")
    params = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in kwargs.items() if v is not None}
    params.setdefault("max_new_tokens", 128)
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    params["skip_special_tokens"] = False  # the text must spell the ids it came from
    return params


# ------------------------------------------------------------------ merge_gen


def _prepare(forks, mode, weights, tau, return_logprob, sampling) -> tuple[MergeBackend, list, list, dict, str]:
    """A merge request over `forks`, checked and synced: the backend, the forks' executors, their
    contexts (token ids), the request body and the routing key."""
    states = list(getattr(forks, "states", forks))
    if not states:
        raise MergeError("merge_gen needs at least one fork (got an empty fork group)")
    if weights is not None and len(weights) != len(states):
        raise MergeError(f"merge_gen: {len(weights)} weights for {len(states)} forks")
    backend = MergeBackend.of_states(states)
    executors = [st.stream_executor for st in states]
    if len({id(ex.arguments) for ex in executors}) != 1:  # forks share their program's arguments
        raise MergeError("merge_gen: the forks come from different program runs; merge forks of one s.fork()")
    for i, ex in enumerate(executors):
        ex.sync()
        if ex.error_ is not None:
            raise MergeError(f"merge_gen: fork {i} failed before the merge: {ex.error_}")
    key = state.route(executors)
    contexts = [backend.context(ex, key) for ex in executors]
    body = engine.merge_body(contexts, sampling_params(sampling), mode=mode, weights=weights, tau=tau)
    body["return_logprob"] = return_logprob
    return backend, executors, contexts, body, key


def merge_gen(forks, name: str, *, mode: str = "logits", weights: list[float] | None = None,
              tau: float | None = None, return_logprob: bool = False, **sampling) -> str:
    """One merge group over `forks`: the same merged answer is appended to every fork, stored as
    `forks[i][name]` (with its meta_info), and returned. Sampling arguments are those of `sgl.gen`;
    `mode` and `tau` (mode "entropy") are the server's merge modes, `weights` one per fork."""
    backend, executors, contexts, body, key = _prepare(forks, mode, weights, tau, return_logprob, sampling)
    return state.append_merged(executors, name, backend.generate(body, key), contexts)


def merge_gen_stream(forks, name: str, *, mode: str = "logits", weights: list[float] | None = None,
                     tau: float | None = None, return_logprob: bool = False, **sampling) -> Iterator[str]:
    """`merge_gen` for chat UIs: yields the merged answer's text piece by piece as it is decoded;
    when the stream ends, the forks hold the answer exactly as after `merge_gen`."""
    backend, executors, contexts, body, key = _prepare(forks, mode, weights, tau, return_logprob, sampling)
    last: dict[int, dict] = {}
    shown = ""
    for chunk in backend.stream(body, key, "merge stream"):
        last[chunk.get("index", 0)] = chunk
        if chunk.get("index", 0) == 0 and chunk["text"].startswith(shown) and len(chunk["text"]) > len(shown):
            yield chunk["text"][len(shown):]
            shown = chunk["text"]
    text = state.append_merged(executors, name, [last[i] for i in range(len(executors))], contexts)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


# ------------------------------------------------------------------ think_merge


def trace_counts(caller: str, name: str, k: int | None, first: int | None, n: int | None) -> tuple[int, int]:
    """(traces used, traces launched) from `k` (all of them) or `first` of `n`, checked."""
    if (k is None) == (first is None):
        raise MergeError(f"{caller}: pass {name} (wait for all of them) or first=m with n=N (first m of N)")
    k = k if first is None else first
    n = k if n is None else n
    if k < 1 or n < k:
        raise MergeError(f"{caller}: need 1 <= {name} <= n, got {name}={k}, n={n}")
    return k, n


def think_merge(s, k: int | None = None, *, first: int | None = None, n: int | None = None,
                name: str = "answer", thinking_budget: int = 2048, thinking_temperature: float = 0.6,
                think_open: str = DEFAULT_OPEN, think_close: str = DEFAULT_CLOSE, mode: str = "logits",
                tau: float | None = None, weighting: str = "uniform", keep: int | None = None,
                confidence_window: int | None = None, **answer_sampling) -> str:
    """The whole ThinkMerge pattern on state `s`: `k` independent thinking traces (each closed
    with `think_close` if it ran out of `thinking_budget`), then one merged answer, appended to `s`
    and returned. `first=k, n=N` launches N traces and answers as soon as the first k finish
    thinking; the others are aborted. The traces are kept in `s[name + "_thinking"]`, each
    member's meta_info in `s.get_meta_info(name)` (a list), and what became of every launched
    trace ("merged", "aborted", ...) in `s.get_meta_info(name + "_traces")`.

    Beyond uniform averaging (as the server's `think_merge` field): `weighting="confidence"`
    weights each trace by its DeepConf confidence, `keep=m` answers with only the m most confident
    of the k (both from the traces' top logprobs, which the server computes in one prefill request;
    `confidence_window` picks the lowest-window variant, see `sgl_merge.confidence`), and
    `mode="entropy"` with `tau` re-weights the members at every answer token. The confidences (of
    the k traces, in the order they finished), the dropped traces' launch indices, the weights and
    the k traces' generated token ids are in `s.get_meta_info(name + "_confidence")`."""
    k, n = trace_counts("think_merge", "k", k, first, n)
    if weighting not in ("uniform", "confidence"):
        raise MergeError(f'think_merge: weighting must be "uniform" or "confidence", got {weighting!r}')
    if keep is not None and not 1 <= keep <= k:
        raise MergeError(f"think_merge: keep must be between 1 and k={k}, got {keep!r}")
    ex = state.synced(s)
    backend = MergeBackend.of_states([s])
    if not ex.text_.rstrip().endswith(think_open):
        s += think_open + "\n"
        ex.sync()
    key = uuid.uuid4().hex  # one routing key for the call: its traces and merge share a worker's cache
    prompt_ids = backend.context(ex, key)
    close_ids = backend.tokenize(think_close, key)
    traces, outcome, launched = backend.think(key, [prompt_ids] * n, k, thinking_budget, thinking_temperature,
                                              [(think_close, close_ids)] * n)
    generated = [list(t["output_ids"]) for t in traces]  # what confidence scores: not a closing </think>
    for trace in traces:
        if not trace["text"].rstrip().endswith(think_close):  # (a stop text is kept; a stop token is not)
            ids = engine.closed(trace["output_ids"], close_ids)
            if len(ids) > len(trace["output_ids"]):  # out of budget: closed here
                trace["output_ids"], trace["text"] = ids, trace["text"] + think_close
    weights, meta = None, {}
    if needs_confidence(weighting, keep):
        choice = engine.choose(len(traces), weighting, keep,
                               backend.confidences(key, prompt_ids, generated, confidence_window))
        dropped = [launched[j] for j in choice.dropped(len(traces))]
        for i in dropped:
            outcome[i] = engine.DROPPED
        traces = [traces[j] for j in choice.kept]
        weights = choice.weights if weighting == "confidence" else None
        meta[f"{name}_confidence"] = {"confidences": choice.confidences, "dropped": dropped,
                                      "weights": choice.weights, "output_ids": generated}
    state.record(ex, meta={**meta, f"{name}_traces": outcome})
    forks = state.branch(s, f"{name}_thinking", key,
                         [(t["text"], t["meta_info"], prompt_ids + t["output_ids"]) for t in traces])
    answer = merge_gen(forks, name, mode=mode, weights=weights, tau=tau, **answer_sampling)
    state.merged(s, name, answer, forks, [t["text"] for t in traces])
    return answer


# ------------------------------------------------------------------ vote


def majority(answers: list) -> tuple[int | None, Counter]:
    """The index of the majority answer (ties go to the answer seen first; None answers are not
    counted; None if there is nothing to count) and the counts."""
    counts = Counter(x for x in answers if x is not None)
    if not counts:
        return None, counts
    best = max(counts.values())
    return next(i for i, x in enumerate(answers) if x is not None and counts[x] == best), counts


def vote(forks, name: str, extract=None) -> tuple[str | None, Counter]:
    """Majority vote over the forks' `name` variable (after `extract`, which may return None for
    "no answer"). Returns the winner (ties go to the answer seen first) and the counts."""
    states = list(getattr(forks, "states", forks))
    extracted = [extract(st[name]) if extract else st[name] for st in states]
    winner, counts = majority(extracted)
    return (None if winner is None else extracted[winner]), counts

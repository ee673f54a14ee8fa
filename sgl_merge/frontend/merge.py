"""ThinkMerge in SGLang programs: `merge_gen` over forks, the `think_merge` pattern, and `vote`.

Used inside `@sgl.function` programs running on a `RuntimeEndpoint` whose server has sgl-merge:

    forks = s.fork(4)
    forks += sgl.gen("thinking", max_tokens=2048, stop="</think>", temperature=0.6)
    answer = sgl_merge.merge_gen(forks, "answer", max_tokens=512, temperature=0.6)

`merge_gen` sends one /generate whose members are the forks' contexts as token ids, with one shared
sampling_params, and writes the one merged answer into every fork. Forks made by `think_merge`
carry the exact ids the server generated (so the radix cache serves each whole branch); other
contexts are tokenized by the server first.

Every request carries the backend's API key (`RuntimeEndpoint(url, api_key=...)`, sent as SGLang's
RuntimeEndpoint sends it: `Authorization: Bearer <key>`); a server that refuses it (HTTP 401/403)
raises APIKeyError, which says so.

Everything here also works through SGLang's model gateway (smg): a group is one request (which
the gateway sends to one worker), every request carries a routing key (`X-SMG-Routing-Key`: one
per `think_merge` call, so its traces and its merge share one worker's cache), the server check
falls back to `/get_server_info`, tokenizing to `/generate`, and traces end by closing their
stream when `/abort_request` is not served.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from collections import Counter
from dataclasses import dataclass, field

import requests

from sgl_merge import confidence, traces as engine
from sgl_merge.contract.join import busy_pauses
from sgl_merge.contract.parathink_layout import THINK_CLOSE, THINK_OPEN

DEFAULT_OPEN, DEFAULT_CLOSE = THINK_OPEN, THINK_CLOSE  # a trace's delimiters, unless a call gives its own
_SAMPLING_ARGS = ("max_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                  "frequency_penalty", "presence_penalty", "ignore_eos", "regex", "json_schema")
_checked_urls: set[tuple[str, str | None]] = set()  # (URL, API key) pairs checked
_without_tokenize: set[str] = set()  # URLs that do not serve /tokenize (the gateway)


class MergeError(RuntimeError):
    """A merge could not run: the message says which fork or setting and what to do."""


# ------------------------------------------------------------------ server access


class APIKeyError(MergeError):
    """The server refused a request for its API key (HTTP 401 or 403): none given, or the wrong one."""


ROUTING_HEADER = "X-SMG-Routing-Key"  # SGLang's gateway (smg) routes requests with one key to one worker


def api_key_message(url: str, status: int, api_key: str | None,
                    how: str = "RuntimeEndpoint(url, api_key=...)") -> str:
    """What a 401/403 from the server at `url` means, for a request sent with `api_key` (None: without
    one); `how` says where the key is given. The key itself is never shown."""
    if api_key is None:
        return (f"the server at {url} requires an API key (HTTP {status}): it was started with --api-key; "
                f"pass that key as {how}")
    return f"the server at {url} refused the API key (HTTP {status}): pass the server's --api-key as {how}"


@dataclass(frozen=True)
class ServerClient:
    """Where a program's requests go: its backend's URL, API key and TLS verification (`verify`: a CA
    bundle path, as SGLang's RuntimeEndpoint takes it), sent with every request as SGLang's
    RuntimeEndpoint sends them (`Authorization: Bearer <key>`)."""

    url: str
    api_key: str | None = None
    verify: str | bool | None = None

    def headers(self, route: str | None = None) -> dict:
        headers = {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}
        if route:
            headers[ROUTING_HEADER] = route
        return headers

    def request(self, method: str, path: str, body: dict | None = None, *, route: str | None = None,
                stream: bool = False, timeout: float | None = None, check: bool = True) -> requests.Response:
        """One request; a 401/403 raises APIKeyError (unless `check` is False: best-effort calls). A
        429 (the server's kept-KV budget is spent for now) is waited out (`busy_pauses`), as the
        server's message asks; then the 429 is the answer."""
        pauses = busy_pauses()
        while True:
            r = requests.request(method, f"{self.url}{path}", json=body, headers=self.headers(route), stream=stream,
                                 timeout=timeout, verify=self.verify)
            if r.status_code != 429 or (pause := next(pauses, None)) is None:
                break
            r.close()
            time.sleep(pause)
        if check and r.status_code in (401, 403):
            r.close()
            raise APIKeyError(api_key_message(self.url, r.status_code, self.api_key))
        return r

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return self.request("POST", path, body, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)


def _backend(states) -> ServerClient:
    backends = {id(st.stream_executor.backend): st.stream_executor.backend for st in states}
    if len(backends) != 1:
        raise MergeError("merge_gen: all forks must come from one program on one backend")
    backend = next(iter(backends.values()))
    url = getattr(backend, "base_url", None)
    if url is None:
        raise MergeError(f"merge_gen needs an SGLang RuntimeEndpoint backend, got {type(backend).__name__}")
    return ServerClient(url.rstrip("/"), getattr(backend, "api_key", None), getattr(backend, "verify", None))


def ensure_merge_server(url: str, api_key: str | None = None, verify: str | None = None) -> None:
    """Check once per URL and key that the server runs sgl-merge, so a plain server fails clearly
    (and a server that wants another API key says so: APIKeyError)."""
    _ensure(ServerClient(url.rstrip("/"), api_key, verify))


def _ensure(server: ServerClient) -> None:
    if (server.url, server.api_key) in _checked_urls:
        return
    try:
        r = server.get("/server_info", timeout=30)
        if r.status_code == 404:  # SGLang's gateway serves only the older name
            r = server.get("/get_server_info", timeout=30)
        states = r.json().get("internal_states") or []
    except (requests.RequestException, ValueError, AttributeError) as e:
        raise MergeError(f"server at {server.url} did not answer /server_info: {e}") from e
    if not any(isinstance(st, dict) and (st.get("sgl_merge") or {}).get("active") for st in states):
        raise MergeError(f"server at {server.url} does not have sgl-merge active; start it with sgl-merge serve")
    _checked_urls.add((server.url, server.api_key))


def _post(server: ServerClient, body: dict, key: str) -> list | dict:
    r = server.post("/generate", body, route=key, timeout=None)
    if r.status_code != 200:
        raise MergeError(f"/generate failed with HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def tokenize(server: ServerClient, text: str, key: str, add_special_tokens: bool = False) -> list[int]:
    """The server's token ids for `text`: /tokenize, or where that is not served (the gateway) the
    prompt ids of a zero-token /generate, which also warms the routed worker's cache."""
    if server.url not in _without_tokenize:
        r = server.post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens}, route=key,
                        timeout=60)
        if r.status_code != 404:
            r.raise_for_status()
            return r.json()["tokens"]
        _without_tokenize.add(server.url)  # asked once per URL
    ids = _prompt_ids(server, text, key)
    if not add_special_tokens:
        ids = ids[len(_special_prefix(server, key)):]
    return ids


def _prompt_ids(server: ServerClient, text: str, key: str) -> list[int]:
    out = _post(server, {"text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                         "logprob_start_len": 0}, key)
    return [t[1] for t in out["meta_info"]["input_token_logprobs"]]


_special_prefixes: dict[str, list[int]] = {}


def _special_prefix(server: ServerClient, key: str) -> list[int]:
    """The tokens the server's tokenizer puts before any prompt (a BOS; often none): what two
    unrelated prompts' ids start with."""
    if server.url not in _special_prefixes:
        a, b = _prompt_ids(server, "a", key), _prompt_ids(server, "b", key)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        _special_prefixes[server.url] = a[:n]
    return _special_prefixes[server.url]


# ------------------------------------------------------------------ contexts of forks


@dataclass
class _Known:
    """Token ids known to spell exactly `text` (what the server generated)."""

    text: str
    ids: list[int] = field(default_factory=list)


def _context(server: ServerClient, executor, key: str) -> list[int]:
    """A fork's current context as token ids: the known ids and the rest tokenized, or the whole
    text tokenized as the server would tokenize the prompt."""
    known: _Known | None = getattr(executor, "_sgl_merge_known", None)
    if known is not None and executor.text_.startswith(known.text):
        rest = executor.text_[len(known.text):]
        return known.ids + (tokenize(server, rest, key) if rest else [])
    return tokenize(server, executor.text_, key, add_special_tokens=True)


def _append(executor, name: str, text: str, meta: dict, ids: list[int] | None = None) -> None:
    """Write a finished generation into a synced executor, as the interpreter would; `ids`, when
    given, are the exact token ids of the executor's whole new text."""
    executor.text_ += text
    executor.variables[name] = text
    executor.meta_info[name] = meta
    if name in executor.variable_event:
        executor.variable_event[name].set()
    if ids is not None:
        executor._sgl_merge_known = _Known(executor.text_, ids)


def _sampling(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(_SAMPLING_ARGS))
    if unknown:
        raise TypeError(f"unexpected sampling argument(s) {unknown}; allowed: {list(_SAMPLING_ARGS)}")
    params = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in kwargs.items() if v is not None}
    params.setdefault("max_new_tokens", 128)
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    params["skip_special_tokens"] = False  # the text must spell the ids it came from
    return params


# ------------------------------------------------------------------ merge_gen


@dataclass
class _Merge:
    """One prepared merge request over synced forks."""

    server: ServerClient
    executors: list
    contexts: list  # token ids, one list per fork
    body: dict
    key: str  # the routing key

    def finish(self, name: str, out: list[dict]) -> str:
        """Append the merged answer of response items `out` to every fork; return its text."""
        text = out[0]["text"]
        for ex, item, ctx in zip(self.executors, out, self.contexts):
            _append(ex, name, text, item["meta_info"], ctx + item["output_ids"])
        return text


def _routing_key(executors) -> str:
    """The forks' routing key: the one their think_merge call used, else a new one."""
    return next((k for ex in executors if (k := getattr(ex, "_sgl_merge_route", None))), uuid.uuid4().hex)


def _prepare(forks, mode, weights, tau, return_logprob, sampling) -> _Merge:
    states = list(getattr(forks, "states", forks))
    if not states:
        raise MergeError("merge_gen needs at least one fork (got an empty fork group)")
    if weights is not None and len(weights) != len(states):
        raise MergeError(f"merge_gen: {len(weights)} weights for {len(states)} forks")
    server = _backend(states)
    _ensure(server)
    executors = [st.stream_executor for st in states]
    if len({id(ex.arguments) for ex in executors}) != 1:  # forks share their program's arguments
        raise MergeError("merge_gen: the forks come from different program runs; merge forks of one s.fork()")
    for i, ex in enumerate(executors):
        ex.sync()
        if ex.error_ is not None:
            raise MergeError(f"merge_gen: fork {i} failed before the merge: {ex.error_}")
    key = _routing_key(executors)
    contexts = [_context(server, ex, key) for ex in executors]
    body = engine.merge_body(contexts, _sampling(sampling), mode=mode, weights=weights, tau=tau)
    body["return_logprob"] = return_logprob
    return _Merge(server, executors, contexts, body, key)


def merge_gen(forks, name: str, *, mode: str = "logits", weights: list[float] | None = None,
              tau: float | None = None, return_logprob: bool = False, **sampling) -> str:
    """One merge group over `forks`: the same merged answer is appended to every fork, stored as
    `forks[i][name]` (with its meta_info), and returned. Sampling arguments are those of `sgl.gen`;
    `mode` and `tau` (mode "entropy") are the server's merge modes, `weights` one per fork."""
    merge = _prepare(forks, mode, weights, tau, return_logprob, sampling)
    return merge.finish(name, _post(merge.server, merge.body, merge.key))


def merge_gen_stream(forks, name: str, *, mode: str = "logits", weights: list[float] | None = None,
                     tau: float | None = None, return_logprob: bool = False, **sampling) -> Iterator[str]:
    """`merge_gen` for chat UIs: yields the merged answer's text piece by piece as it is decoded;
    when the stream ends, the forks hold the answer exactly as after `merge_gen`."""
    merge = _prepare(forks, mode, weights, tau, return_logprob, sampling)
    last: dict[int, dict] = {}
    shown = ""
    with merge.server.post("/generate", {**merge.body, "stream": True}, stream=True, route=merge.key,
                           timeout=None) as r:
        if r.status_code != 200:
            raise MergeError(f"/generate failed with HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if "error" in chunk:
                raise MergeError(f"merge stream failed: {chunk['error']}")
            last[chunk.get("index", 0)] = chunk
            if chunk.get("index", 0) == 0 and chunk["text"].startswith(shown) and len(chunk["text"]) > len(shown):
                yield chunk["text"][len(shown):]
                shown = chunk["text"]
    text = merge.finish(name, [last[i] for i in range(len(merge.executors))])
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


# ------------------------------------------------------------------ think_merge


@dataclass
class _Trace:
    rid: str
    result: dict | None = None
    error: Exception | None = None


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
    ex = s.stream_executor
    ex.sync()
    server = _backend([s])
    _ensure(server)
    if not ex.text_.rstrip().endswith(think_open):
        s += think_open + "\n"
        ex.sync()
    key = uuid.uuid4().hex  # one routing key for the call: its traces and merge share a worker's cache
    prompt_ids = _context(server, ex, key)
    close_ids = tokenize(server, think_close, key)
    traces, outcome, launched = _think(server, key, [prompt_ids] * n, k, thinking_budget, thinking_temperature,
                                       [(think_close, close_ids)] * n)
    generated = [list(t["output_ids"]) for t in traces]  # what confidence scores: not a closing </think>
    for trace in traces:
        if not trace["text"].rstrip().endswith(think_close):  # (a stop text is kept; a stop token is not)
            ids = engine.closed(trace["output_ids"], close_ids)
            if len(ids) > len(trace["output_ids"]):  # out of budget: closed here
                trace["output_ids"], trace["text"] = ids, trace["text"] + think_close
    weights = None
    if engine.needs_confidence(weighting, keep):
        choice = engine.choose(len(traces), weighting, keep,
                               _confidences(server, key, prompt_ids, generated, confidence_window))
        dropped = [launched[j] for j in choice.dropped(len(traces))]
        for i in dropped:
            outcome[i] = engine.DROPPED
        traces = [traces[j] for j in choice.kept]
        weights = choice.weights if weighting == "confidence" else None
        ex.meta_info[f"{name}_confidence"] = {"confidences": choice.confidences, "dropped": dropped,
                                              "weights": choice.weights, "output_ids": generated}
    ex.meta_info[f"{name}_traces"] = outcome
    forks = s.fork(len(traces))
    thinking = []
    for fork, trace in zip(forks, traces):
        fork.stream_executor._sgl_merge_route = key
        fork.stream_executor.sync()
        _append(fork.stream_executor, f"{name}_thinking", trace["text"], trace["meta_info"],
                prompt_ids + trace["output_ids"])
        thinking.append(trace["text"])
    answer = merge_gen(forks, name, mode=mode, weights=weights, tau=tau, **answer_sampling)
    ex.variables[f"{name}_thinking"] = thinking
    ex.meta_info[name] = [f.stream_executor.meta_info[name] for f in forks]  # one per member
    for f in forks:  # the forks' worker threads are done; end them now, as join() would
        f.stream_executor.end()
    s += answer
    ex.sync()
    ex.variables[name] = answer
    return answer


def _confidences(server: ServerClient, key: str, prompt_ids: list[int], ids: list[list[int]],
                 window: int | None) -> list[float]:
    """Each trace's confidence, from the top logprobs of one scoring request (`sgl_merge.confidence`)."""
    return confidence.scored_confidences(_post(server, confidence.scoring_request(prompt_ids, ids), key), ids, window)


def _think(server, key, prompts, k, budget, temperature, closes, extra=None) -> tuple[list[dict], list[str], list[int]]:
    """Run one thinking trace per prompt concurrently (`prompts[i]` ids, stopping at `closes[i]`, a
    (text, ids) pair, with `extra[i]` sampling parameters where given); return the first k to finish (ending the rest), each launched trace's
    outcome, and the launch index of each returned. Traces stream, so one that is no longer needed
    ends when its stream is closed (SGLang aborts a request whose client left), also where
    `/abort_request` is not served."""
    n = len(prompts)
    traces = [_Trace(rid=f"think-{uuid.uuid4().hex}") for _ in range(n)]
    trace_set = engine.TraceSet(n, k)
    ended = 0
    cond = threading.Condition()
    enough = threading.Event()

    def run(i):
        nonlocal ended
        body = {"input_ids": prompts[i],
                "sampling_params": {**engine.thinking_params(budget, temperature, closes[i][1], closes[i][0]),
                                    **(extra[i] if extra else {})},
                "rid": traces[i].rid, "stream": True}
        try:
            traces[i].result = _stream_until(server, body, key, enough)
        except (MergeError, requests.RequestException) as e:
            traces[i].error = e
        with cond:
            trace_set.finish(i, traces[i].result, traces[i].error)
            ended += 1
            cond.notify_all()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    with cond:
        cond.wait_for(lambda: trace_set.enough or ended == n)
        enough.set()
        running = [t for i, t in enumerate(traces) if t.result is None and t.error is None]
    for t in running:
        server.post("/abort_request", {"rid": t.rid}, route=key, timeout=30, check=False)
    for t in threads:
        t.join()
    if (shortfall := trace_set.shortfall("thinking traces")) is not None:
        refused = next((t.error for t in traces if isinstance(t.error, APIKeyError)), None)
        if refused is not None:
            raise APIKeyError(str(refused)) from refused
        raise MergeError(f"think_merge: {shortfall}")
    return [trace_set.results[i] for i in trace_set.used], trace_set.outcomes, trace_set.used


def _stream_until(server: ServerClient, body: dict, key: str, stop: threading.Event) -> dict:
    """POST a streaming /generate and return its last chunk (the whole result); once `stop` is set
    the stream is closed and the result is marked aborted."""
    with server.post("/generate", body, route=key, stream=True, timeout=None) as r:
        if r.status_code != 200:
            raise MergeError(f"/generate failed with HTTP {r.status_code}: {r.text[:500]}")
        last = None
        for line in r.iter_lines(decode_unicode=True):
            if stop.is_set():
                return {"meta_info": {"finish_reason": {"type": "abort", "message": "no longer needed"}}}
            if not line or not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if "error" in chunk:
                raise MergeError(f"trace failed: {chunk['error']}")
            last = chunk
    if last is None:
        raise MergeError("a thinking trace's stream ended without output")
    return last


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

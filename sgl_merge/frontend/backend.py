"""The frontend's backend: all of its HTTP, as `sglang.lang` keeps its own in its `RuntimeEndpoint`,
so that a program call (`merge`, `parathink`) only checks its arguments, calls the backend and has
the results written into the program state (`state`).

`ServerClient` is the transport: a program's URL, API key (sent as SGLang's RuntimeEndpoint sends
it: `Authorization: Bearer <key>`; a refusal, HTTP 401/403, raises APIKeyError, which says so) and
TLS verification, with a 429 (the kept-KV budget spent for now) waited out. `MergeBackend` sends
every request of the program calls and of the KV-join `RuntimeEndpoint` (`endpoint`), and keeps
what it learns about its server (checked; /tokenize not served; the special prefix; ParaThinker's
control ids): one per URL, key and verification (`MergeBackend.of`), which a stock
`sglang.RuntimeEndpoint` gets on first use and `sgl_merge.RuntimeEndpoint` holds as `merge_backend`.

Through SGLang's model gateway (smg): a merge group is one request (which the gateway sends to one
worker), a call's requests carry one routing key (`X-SMG-Routing-Key`: think_merge's traces and
merge share a worker's cache), the server check falls back to `/get_server_info`, tokenizing to
`/generate`, and traces end by closing their stream where `/abort_request` is not served.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import requests

from sgl_merge import confidence, traces as engine
from sgl_merge.contract.join import JOIN_KEY, busy_pauses
from sgl_merge.contract.parathink_layout import find_control_ids, has_layout
from sgl_merge.frontend import state


class MergeError(RuntimeError):
    """A merge could not run: the message says which fork or setting and what to do."""


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


class MergeBackend:
    """The sgl-merge server behind a program: every request the frontend sends, and what it has
    learnt about that server. `key` arguments are routing keys (None: no routing header)."""

    _made: dict[ServerClient, MergeBackend] = {}
    _making = threading.Lock()

    def __init__(self, client: ServerClient):
        self.client = client
        self.checked = False  # the server runs sgl-merge
        self.tokenize_served = True  # False behind the gateway: /tokenize answered 404 (asked once)
        self._special_prefix: list[int] | None = None
        self._control_ids: dict[str, int] | None = None

    @classmethod
    def of(cls, client: ServerClient) -> MergeBackend:
        """The one backend for this URL, API key and verification, made on first use."""
        with cls._making:
            if client not in cls._made:
                cls._made[client] = cls(client)
            return cls._made[client]

    @classmethod
    def of_states(cls, states) -> MergeBackend:
        """The checked backend of the states' program (its `RuntimeEndpoint`'s URL, key and verify as
        they are now: a key changed on the endpoint is the key sent)."""
        endpoints = {id(st.stream_executor.backend): st.stream_executor.backend for st in states}
        if len(endpoints) != 1:
            raise MergeError("merge_gen: all forks must come from one program on one backend")
        endpoint = next(iter(endpoints.values()))
        url = getattr(endpoint, "base_url", None)
        if url is None:
            raise MergeError(f"merge_gen needs an SGLang RuntimeEndpoint backend, got {type(endpoint).__name__}")
        backend = cls.of(ServerClient(url.rstrip("/"), getattr(endpoint, "api_key", None),
                                      getattr(endpoint, "verify", None)))
        backend.ensure()
        return backend

    # -------------------------------------------------------------- the server

    def ensure(self) -> None:
        """Check once that the server runs sgl-merge, so a plain server fails clearly (and a server
        that wants another API key says so: APIKeyError)."""
        if self.checked:
            return
        try:
            r = self.client.get("/server_info", timeout=30)
            if r.status_code == 404:  # SGLang's gateway serves only the older name
                r = self.client.get("/get_server_info", timeout=30)
            states = r.json().get("internal_states") or []
        except (requests.RequestException, ValueError, AttributeError) as e:
            raise MergeError(f"server at {self.client.url} did not answer /server_info: {e}") from e
        if not any(isinstance(st, dict) and (st.get("sgl_merge") or {}).get("active") for st in states):
            raise MergeError(f"server at {self.client.url} does not have sgl-merge active; start it with sgl-merge serve")
        self.checked = True

    def generate(self, body: dict, key: str | None = None, *, failed: str = "/generate failed with HTTP",
                 shown: int = 500) -> list | dict:
        """One /generate; a refusal raises MergeError("`failed` <status>: <the first `shown` characters>")."""
        r = self.client.post("/generate", body, route=key, timeout=None)
        if r.status_code != 200:
            raise MergeError(f"{failed} {r.status_code}: {r.text[:shown]}")
        return r.json()

    def stream(self, body: dict, key: str | None, what: str, stop: threading.Event | None = None) -> Iterator[dict]:
        """A streaming /generate's chunks as they come; a chunk with an error raises MergeError
        ("`what` failed: ..."). Once `stop` is set the stream is closed (SGLang aborts a request
        whose client left) and ends with an aborted chunk."""
        with self.client.post("/generate", {**body, "stream": True}, route=key, stream=True, timeout=None) as r:
            if r.status_code != 200:
                raise MergeError(f"/generate failed with HTTP {r.status_code}: {r.text[:500]}")
            for line in r.iter_lines(decode_unicode=True):
                if stop is not None and stop.is_set():
                    yield {"meta_info": {"finish_reason": {"type": "abort", "message": "no longer needed"}}}
                    return
                if not line or not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data:"):])
                if "error" in chunk:
                    raise MergeError(f"{what} failed: {chunk['error']}")
                yield chunk

    def abort(self, rid: str, key: str | None = None) -> None:
        self.client.post("/abort_request", {"rid": rid}, route=key, timeout=30, check=False)

    # -------------------------------------------------------------- token ids

    def tokenize(self, text: str, key: str | None, add_special_tokens: bool = False) -> list[int]:
        """The server's token ids for `text`: /tokenize, or where that is not served (the gateway) the
        prompt ids of a zero-token /generate, which also warms the routed worker's cache."""
        if self.tokenize_served:
            r = self.client.post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens}, route=key,
                                 timeout=60)
            if r.status_code != 404:
                r.raise_for_status()
                return r.json()["tokens"]
            self.tokenize_served = False
        ids = self._prompt_ids(text, key)
        return ids if add_special_tokens else ids[len(self._special(key)):]

    def _prompt_ids(self, text: str, key: str | None) -> list[int]:
        out = self.generate({"text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                             "logprob_start_len": 0}, key)
        return [t[1] for t in out["meta_info"]["input_token_logprobs"]]

    def _special(self, key: str | None) -> list[int]:
        """The tokens the server's tokenizer puts before any prompt (a BOS; often none): what two
        unrelated prompts' ids start with."""
        if self._special_prefix is None:
            a, b = self._prompt_ids("a", key), self._prompt_ids("b", key)
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            self._special_prefix = a[:n]
        return self._special_prefix

    def context(self, executor, key: str | None) -> list[int]:
        """A state's current context as token ids: the ids known for its text (`state.known`) and the
        rest tokenized, or the whole text tokenized as the server would tokenize the prompt."""
        ids, rest = state.known(executor)
        if ids is None:
            return self.tokenize(rest, key, add_special_tokens=True)
        return ids + (self.tokenize(rest, key) if rest else [])

    def _single(self, key: str | None):
        """The server's `single` (`sgl_merge.contract.parathink_layout`): the id of a text that is one
        token, else None."""
        def single(text):
            ids = self.tokenize(text, key)
            return ids[0] if len(ids) == 1 else None

        return single

    def has_layout(self, key: str | None) -> bool:
        """Whether the server's tokenizer has ParaThinker's control tokens (`<think1>`, `<summary>`)."""
        return has_layout(self._single(key))

    def control_ids(self, key: str | None) -> dict[str, int]:
        """The server's ParaThinker control tokens (text -> id), so that no path samples another's."""
        if self._control_ids is None:
            self._control_ids = find_control_ids(self._single(key))
        return self._control_ids

    # -------------------------------------------------------------- traces

    def think(self, key: str, prompts: list[list[int]], k: int, budget: int, temperature: float,
              closes: list[tuple[str, list[int]]], extra: list[dict] | None = None
              ) -> tuple[list[dict], list[str], list[int]]:
        """Run one thinking trace per prompt concurrently (`prompts[i]` ids, stopping at `closes[i]`, a
        (text, ids) pair, with `extra[i]` sampling parameters where given); return the first k to
        finish (ending the rest), each launched trace's outcome, and the launch index of each
        returned. Traces stream, so one that is no longer needed ends when its stream is closed,
        also where `/abort_request` is not served."""
        n = len(prompts)
        rids = [f"think-{uuid.uuid4().hex}" for _ in range(n)]
        trace_set, ended, errors = engine.TraceSet(n, k), set(), []
        cond, enough = threading.Condition(), threading.Event()

        def run(i):
            body = {"input_ids": prompts[i],
                    "sampling_params": {**engine.thinking_params(budget, temperature, closes[i][1], closes[i][0]),
                                        **(extra[i] if extra else {})},
                    "rid": rids[i]}
            last = error = None
            try:
                for last in self.stream(body, key, "trace", enough):
                    pass
                if last is None:
                    raise MergeError("a thinking trace's stream ended without output")
            except (MergeError, requests.RequestException) as e:
                last, error = None, e
            with cond:
                trace_set.finish(i, last, error)
                ended.add(i)
                errors.append(error)
                cond.notify_all()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        with cond:
            cond.wait_for(lambda: trace_set.enough or len(ended) == n)
            enough.set()
            running = [rid for i, rid in enumerate(rids) if i not in ended]
        for rid in running:
            self.abort(rid, key)
        for t in threads:
            t.join()
        if (shortfall := trace_set.shortfall("thinking traces")) is not None:
            refused = next((e for e in errors if isinstance(e, APIKeyError)), None)
            if refused is not None:
                raise APIKeyError(str(refused)) from refused
            raise MergeError(f"think_merge: {shortfall}")
        return [trace_set.results[i] for i in trace_set.used], trace_set.outcomes, trace_set.used

    def confidences(self, key: str, prompt_ids: list[int], ids: list[list[int]], window: int | None) -> list[float]:
        """Each trace's confidence, from the top logprobs of one scoring request (`sgl_merge.confidence`)."""
        return confidence.scored_confidences(self.generate(confidence.scoring_request(prompt_ids, ids), key), ids,
                                             window)

    # -------------------------------------------------------------- kept KV and joins

    def keep(self, prompt: dict, rid: str, owner: str, key: str | None = None, ttl_s: float | None = None,
             **failure) -> None:
        """Keep `prompt`'s KV (`text` or `input_ids`) on the server as source `rid` of `owner`: a
        prefill of its last token where the rest is cached. `failure`: as `generate`'s."""
        self.generate({**prompt, "rid": rid, "sampling_params": engine.keep_params(owner, ttl_s)}, key, **failure)

    def release(self, rids: list[str], owner: str, key: str | None = None) -> None:
        """Let go of kept sources (best effort: the server drops them after their TTL anyway)."""
        if rids:
            self.client.post("/sgl_merge/release", {"rids": rids, "owner": owner}, route=key, timeout=30, check=False)

    def join(self, key: str, prompt_ids: list[int], paths: list[list[int]], prefix: str, sampling: dict,
             positions: str) -> tuple[list[int], dict]:
        """Keep each whole path after `prompt_ids` (its closing token included: the trace's own KV
        lacks its last sampled token, so a prefill of that token; the rest is in the radix cache
        from the trace), then generate from `prefix` over all of them: the KV join. Returns the
        prefix's ids and the output. The sources are released by the join, or here if it never ran."""
        sources, owner = [], secrets.token_urlsafe(18)
        try:
            for ids in paths:
                rid = f"parathink-{uuid.uuid4().hex}"
                self.keep({"input_ids": prompt_ids + ids}, rid, owner, key)
                sources.append(rid)
            continuation = self.tokenize(prefix, key)
            sampling = engine.with_entry(sampling, JOIN_KEY, engine.join_entry(sources, owner, len(prompt_ids),
                                                                                positions))
            return continuation, self.generate({"input_ids": continuation, "sampling_params": sampling}, key)
        except MergeError:
            self.release(sources, owner, key)
            raise

"""`forks.join("concate_and_append")` as a real KV join: a RuntimeEndpoint that names its forks' KV.

SGLang's frontend joins forks by POSTing its own state ids to `/concate_and_append_request`, ids
the server never saw, so with a stock `RuntimeEndpoint` no server can find those forks' KV
(`sgl-merge serve` answers the route and the program goes on as a text join). With this backend:

- at the join, each fork's committed text is kept on the server (`sgl_merge_keep`: a prefill of
  its last token, since the fork's commit already cached the rest) under an id of this backend;
- every later request of the joined state (gen, select, commit) sends only its text after the
  join, with `sgl_merge_join` naming those sources: the forks' KV is read as it is, each fork
  having attended to the shared prefix and to itself only (what SGLang's parallel encoding means);
- when the program ends, the sources are released (`/sgl_merge/release`).

The join's requests, like every other sgl-merge request of its programs, go through the endpoint's
`merge_backend` (`backend.MergeBackend`). Everything else is SGLang's RuntimeEndpoint, unchanged.
"""

from __future__ import annotations

import secrets
import threading
import uuid
import weakref
from dataclasses import dataclass

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint as _SGLangRuntimeEndpoint

from sgl_merge import traces as engine
from sgl_merge.contract.join import JOIN_KEY, POSITIONS
from sgl_merge.frontend.backend import MergeBackend, MergeError, ServerClient

DEFAULT_KEEP_TTL_S = 600.0


@dataclass
class _Joined:
    """A state's KV join: the kept sources and the text they spell (the state's text at the join)."""

    sources: list[str]
    owner: str  # the secret the sources are kept under (one per join)
    prompt_len: int  # tokens of the forks' shared prefix
    text: str


class RuntimeEndpoint(_SGLangRuntimeEndpoint):
    """SGLang's RuntimeEndpoint whose `forks.join("concate_and_append")` joins KV on sgl-merge serve.

    `positions`: where the joined state's new tokens continue, "after_longest" (after the shared
    prefix and the longest fork) or "sequential" (after the whole concatenation); see docs/kv-join.md.
    `keep_ttl_s`: how long the server keeps a join's sources if the program never ends.
    `api_key`, `verify`, `chat_template_name`: SGLang's; the key goes with every request, and a server
    that refuses it (or wants one) raises APIKeyError here. `merge_backend`: the endpoint's
    sgl-merge requests (the server check here, the join's keeps and releases, and the program calls').
    """

    def __init__(self, base_url: str, api_key: str | None = None, verify: str | None = None,
                 chat_template_name: str | None = None, *, positions: str = "after_longest",
                 keep_ttl_s: float = DEFAULT_KEEP_TTL_S):
        if positions not in POSITIONS:
            raise MergeError(f"RuntimeEndpoint(positions={positions!r}): must be one of {list(POSITIONS)}")
        # Checked before SGLang's constructor, whose first request would report a refused key only as
        # {'error': 'Unauthorized'}.
        self.merge_backend = MergeBackend.of(ServerClient(base_url.rstrip("/"), api_key, verify))
        self.merge_backend.ensure()
        super().__init__(base_url, api_key, verify, chat_template_name)
        self.base_url = self.base_url.rstrip("/")
        self.positions = positions
        self.keep_ttl_s = keep_ttl_s
        self._states = weakref.WeakValueDictionary()  # state id -> the StreamExecutor that sent a request
        self._joined: dict[str, _Joined] = {}

    def _add_images(self, s, data):
        """Called by every request SGLang's RuntimeEndpoint sends for a state: remember the state, and
        turn the request of a joined state into a join of its sources plus its text after the join."""
        super()._add_images(s, data)
        self._states[s.sid] = s
        joined = self._joined.get(s.sid)
        texts = data.get("text")
        if joined is None or texts is None:
            return
        many = isinstance(texts, list)
        rests = [t[len(joined.text):] if t.startswith(joined.text) else None for t in (texts if many else [texts])]
        if any(not rest for rest in rests):
            return  # nothing after the join (or another text): sent as it is, a plain computation
        data["text"] = rests if many else rests[0]
        data["sampling_params"] = engine.with_entry(data.get("sampling_params"), JOIN_KEY, engine.join_entry(
            joined.sources, joined.owner, joined.prompt_len, self.positions, release_sources=False))

    def concatenate_and_append(self, src_rids, dst_rid):
        forks = [self._states.get(rid) for rid in src_rids]  # each committed its text just before
        if any(f is None for f in forks):
            return  # not committed through this backend: the join stays a text join
        # SGLang's frontend asserts that every fork started at the joining state's end, and appends
        # each fork's text after that point to it.
        start = forks[0].fork_start_text_pos
        shared = forks[0].text_[:start]
        joined_text = shared + "".join(f.text_[f.fork_start_text_pos:] for f in forks)
        # The shared prefix's length in tokens (cached by the forks' commits: a prefill of one token).
        prefix = self.merge_backend.generate({"text": shared, "sampling_params": {"max_new_tokens": 0}},
                                             **_failure("the forks' shared prefix"))
        sources, owner = [], secrets.token_urlsafe(18)
        for fork in forks:
            rid = f"sgl-merge-fork-{uuid.uuid4().hex}"
            try:
                self.merge_backend.keep({"text": fork.text_}, rid, owner, ttl_s=self.keep_ttl_s,
                                        **_failure(f"fork {fork.sid}"))
            except MergeError:
                self.merge_backend.release(sources, owner)
                raise
            sources.append(rid)
        old = self._joined.pop(dst_rid, None)
        self._joined[dst_rid] = _Joined(sources, owner, prefix["meta_info"]["prompt_tokens"], joined_text)
        if old is not None:
            self.merge_backend.release(old.sources, old.owner)

    def end_program(self, s):
        """SGLang calls this as soon as a program function returns, while the state's worker thread may
        still run its queued requests (which read the join): release once that thread is done."""
        for state in s if isinstance(s, list) else [s]:
            if state.sid not in self._joined:
                continue
            worker = getattr(state, "worker", None) if getattr(state, "use_thread", False) else None
            if worker is None or not worker.is_alive():
                self._end_join(state.sid)
            else:
                threading.Thread(target=self._end_join, args=(state.sid, worker), daemon=True).start()
        return super().end_program(s)

    def _end_join(self, sid: str, worker=None) -> None:
        if worker is not None:
            worker.join()
        joined = self._joined.pop(sid, None)
        if joined is not None:
            self.merge_backend.release(joined.sources, joined.owner)


def _failure(what: str) -> dict:
    """How a refused request of the join reads (`MergeBackend.generate`'s `failed` and `shown`)."""
    return {"failed": f"concate_and_append: keeping {what} for the KV join failed: HTTP", "shown": 300}

"""The KV join: a request that starts from the concatenated KV of earlier sequences.

Two request fields (`sampling_params.custom_params`):

    "sgl_merge_keep": true | {"ttl_s": 300}
        When this request finishes, keep its KV (prompt + output, all but the last sampled
        token, which never went through the model) locked in the radix cache for a later join,
        until a join releases it or `ttl_s` seconds pass.

    "sgl_merge_join": {"sources": ["rid-a", "rid-b", ...], "prompt_len": P,
                       "positions": "after_longest" | "sequential", "release_sources": true}
        This request's input is the continuation only. It runs after
        prompt(P tokens, shared by all sources) + part_1 + ... + part_n, where part_i is source
        i's kept tokens from P on, read from the sources' KV as it is: nothing is copied or
        recomputed, only the continuation is prefilled. Positions of the continuation start at
        P + the longest part ("after_longest", ParaThinker's convention) or at P + the sum of the
        parts ("sequential", what one sequence of that length would get). P defaults to the
        sources' longest common prefix (with one source: its whole length).

Why it is exact and leaves the cache sound: each part's KV was computed attending to the prompt
and that part only, which is the join's definition; the joined sequence is no sequential
computation, so it never enters the radix cache (`skip_radix_cache_insert`) and its prefix is
claimed from the pins, never matched, so an unrelated request that sends the same tokens gets a
plain computation. The sources' own sequences (prompt + part_i) stay in the cache: they are
sequential.

Lifecycle: a kept source is a lock on its radix-tree leaf; a join holds it from arrival to finish
(retraction included); `release_sources` drops the pins when the join finishes; expiry goes
through SGLang's broadcast abort path so every tensor-parallel rank unlocks the same node in the
same iteration, and so does an early release (`POST /sgl_merge/release {"rids": [...]}`);
`/flush_cache` (only possible when idle) forgets all pins with the tree.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from array import array
from dataclasses import dataclass, field
from http import HTTPStatus

from sgl_merge.runtime.spec import KEY as MERGE_KEY, MergeSpecError

logger = logging.getLogger("sgl_merge")

KEEP_KEY = "sgl_merge_keep"
JOIN_KEY = "sgl_merge_join"
KEEP_PREFIX = f"sampling_params.custom_params.{KEEP_KEY}"
JOIN_PREFIX = f"sampling_params.custom_params.{JOIN_KEY}"
POSITIONS = ("after_longest", "sequential")
JOIN_FIELDS = ("sources", "prompt_len", "positions", "release_sources")
DEFAULT_TTL_S = 300.0
MAX_TTL_S = 24 * 3600.0
MAX_SOURCES = 256
RELEASE_RID = "sgl-merge-release:"  # aborts aimed at a kept source (expiry, /sgl_merge/release), not at a request


# ------------------------------------------------------------------ the request contract


@dataclass(frozen=True)
class JoinSpec:
    sources: tuple[str, ...]
    prompt_len: int | None = None
    positions: str = "after_longest"
    release_sources: bool = True


def parse_keep(custom_params) -> float | None:
    """The keep TTL in seconds, None if the request does not ask to be kept."""
    if not isinstance(custom_params, dict) or KEEP_KEY not in custom_params:
        return None
    entry = custom_params[KEEP_KEY]
    if entry is True:
        return DEFAULT_TTL_S
    if isinstance(entry, dict) and set(entry) <= {"ttl_s"}:
        ttl = entry.get("ttl_s", DEFAULT_TTL_S)
        if not isinstance(ttl, bool) and isinstance(ttl, (int, float)) and math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S:
            return float(ttl)
        raise MergeSpecError(f"{KEEP_PREFIX}.ttl_s must be a number of seconds in (0, {MAX_TTL_S:g}], got {ttl!r}")
    raise MergeSpecError(f'{KEEP_PREFIX} must be true or {{"ttl_s": seconds}}, got {entry!r}')


def parse_join(custom_params) -> JoinSpec | None:
    """The request's JoinSpec, None if it does not ask for a join; MergeSpecError if malformed."""
    if not isinstance(custom_params, dict) or JOIN_KEY not in custom_params:
        return None
    entry = custom_params[JOIN_KEY]
    if not isinstance(entry, dict):
        raise MergeSpecError(f'{JOIN_PREFIX} must be an object like {{"sources": ["<rid>", ...]}}, '
                             f"got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(JOIN_FIELDS))
    if unknown:
        raise MergeSpecError(f"{JOIN_PREFIX} has unknown field(s) {unknown}; allowed: {list(JOIN_FIELDS)}")
    sources = entry.get("sources")
    if (not isinstance(sources, list) or not 1 <= len(sources) <= MAX_SOURCES
            or not all(isinstance(s, str) and s for s in sources)):
        raise MergeSpecError(f"{JOIN_PREFIX}.sources must be a list of 1 to {MAX_SOURCES} request ids (rids of "
                             f"finished requests sent with {KEEP_KEY}), got {sources!r}")
    if len(set(sources)) != len(sources):
        raise MergeSpecError(f"{JOIN_PREFIX}.sources names a request twice: {sources!r}")
    prompt_len = entry.get("prompt_len")
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0):
        raise MergeSpecError(f"{JOIN_PREFIX}.prompt_len must be an integer >= 0 (tokens the sources share), "
                             f"got {prompt_len!r}")
    positions = entry.get("positions", "after_longest")
    if positions not in POSITIONS:
        raise MergeSpecError(f"{JOIN_PREFIX}.positions must be one of {list(POSITIONS)}, got {positions!r}")
    release = entry.get("release_sources", True)
    if not isinstance(release, bool):
        raise MergeSpecError(f"{JOIN_PREFIX}.release_sources must be true or false, got {release!r}")
    if MERGE_KEY in custom_params:
        raise MergeSpecError(f"{JOIN_PREFIX} cannot be combined with custom_params.{MERGE_KEY} (yet): send the join "
                             "as a plain request")
    return JoinSpec(tuple(sources), prompt_len, positions, release)


def verify(params) -> None:
    """Tokenizer-side validation of both fields of a SamplingParams (a 400 naming the field)."""
    parse_keep(params.custom_params)
    if parse_join(params.custom_params) is not None and (params.n or 1) > 1:
        raise MergeSpecError(f"sampling_params.n = {params.n} cannot be combined with {JOIN_PREFIX}: send n join "
                             "requests (each one a join of the same sources, with release_sources false)")


# ------------------------------------------------------------------ the scheduler's state


@dataclass(eq=False)
class KeptSource:
    """A finished request's KV, locked in the radix tree: `tokens` are what its path holds."""

    rid: str
    lock: object
    node: object
    tokens: array
    namespace: tuple
    deadline: float
    holders: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # joins reading this KV
    expiring: bool = False

    def held(self) -> bool:
        # A join aborted while still waiting never releases a row: finished is enough to let go.
        return any(not r.finished() for r in self.holders)


@dataclass(eq=False)
class Join:
    """What a join request claims: the sources, the shared prompt length, each part's length."""

    sources: list[KeptSource]
    prompt_len: int
    part_lens: list[int]
    delta: int  # subtracted from every position of the request ("after_longest")
    release_sources: bool
    released: bool = field(default=False)

    @property
    def joined_len(self) -> int:
        return self.prompt_len + sum(self.part_lens)

    def kv_indices(self, tree):
        import torch

        first = tree.path_device_indices(self.sources[0].node)
        pieces = [first[: self.prompt_len]]
        for source, n in zip(self.sources, self.part_lens):
            pieces.append(tree.path_device_indices(source.node)[self.prompt_len: self.prompt_len + n])
        return torch.cat(pieces).to(torch.int64)


class JoinRegistry:
    """Kept sources and live joins of one scheduler process."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.kept: dict[str, KeptSource] = {}
        self.position_delta = None  # [req pool rows] on the device, lazily
        self.delta_rows: set[int] = set()

    # ---------------------------------------------------------------- keeping

    def refusal(self) -> str | None:
        """Why this server cannot join at all, or None."""
        tree, args = self.scheduler.tree_cache, self.scheduler.server_args
        if getattr(tree, "disable", False) or not hasattr(tree, "path_device_indices"):
            return "the radix cache is disabled (--disable-radix-cache); a join reads its sources from it"
        if tree.page_size != 1:
            return f"--page-size {tree.page_size}: a join needs --page-size 1 (parts do not start on page boundaries)"
        if tree.supports_swa() or tree.supports_mamba():
            return "the model has sliding-window or Mamba layers, whose state a join cannot concatenate"
        if getattr(args, "speculative_algorithm", None):
            return "speculative decoding is on (--speculative-algorithm)"
        if getattr(args, "enable_hierarchical_cache", False) or getattr(args, "disaggregation_mode", "null") != "null":
            return "hierarchical cache or prefill/decode disaggregation is on"
        if (getattr(args, "dp_size", 1) or 1) > 1:
            return (f"--dp-size {args.dp_size}: each data-parallel rank has its own cache, and a join's sources may "
                    "have gone to another rank (run the join on a --dp-size 1 server, or scale with the gateway)")
        return None

    def keep(self, req, ttl_s: float) -> None:
        """Lock a finished request's radix-tree leaf (called right after SGLang checkpointed it)."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        if isinstance(req.finished_reason, FINISH_ABORT) or self.refusal() is not None or req.last_node is None:
            return
        tree = self.scheduler.tree_cache
        n = len(tree.path_device_indices(req.last_node))
        if n < len(req.origin_input_ids) + len(req.output_ids) - 1:
            logger.warning("sgl-merge: request %s is not kept: only %d of its tokens are in the radix cache",
                           req.rid, n)
            return
        old = self.kept.pop(req.rid, None)
        if old is not None:
            self._unlock(old)
        self.kept[req.rid] = KeptSource(
            rid=req.rid, lock=tree.lock(req.last_node), node=req.last_node,
            tokens=array("q", req.full_untruncated_fill_ids[:n]), namespace=(req.extra_key, req.cache_salt),
            deadline=time.monotonic() + ttl_s)

    def _unlock(self, source: KeptSource) -> None:
        self.scheduler.tree_cache.unlock(source.lock)

    def drop(self, rid: str) -> None:
        source = self.kept.pop(rid, None)
        if source is not None:
            self._unlock(source)

    def expiry_aborts(self) -> list:
        """Aborts for kept sources past their TTL that no join holds, polled on one rank and broadcast
        by SGLang so every rank unlocks the same nodes in the same iteration."""
        from sglang.srt.managers.io_struct import AbortReq

        now, aborts = time.monotonic(), []
        for source in self.kept.values():
            if not source.expiring and now > source.deadline and not source.held():
                source.expiring = True
                aborts.append(AbortReq(rid=RELEASE_RID + source.rid))
        return aborts

    def release(self, rid: str) -> None:
        """Let go of a kept source (its expiry, or a client's release): at once, or when the last join
        reading it finishes."""
        source = self.kept.get(rid)
        if source is None:
            return
        source.deadline = 0.0
        if not source.held():
            self.drop(rid)

    def forget_all(self) -> None:
        """After /flush_cache reset the tree: its locks went with it."""
        self.kept.clear()
        self.position_delta = None
        self.delta_rows.clear()

    # ---------------------------------------------------------------- joins

    def plan(self, req, spec: JoinSpec) -> Join | str:
        """The request's Join, or the reason it cannot have one (a 400 message)."""
        refusal = self.refusal()
        if refusal is not None:
            return f"{JOIN_PREFIX}: this server cannot join: {refusal}"
        sources = []
        for i, rid in enumerate(spec.sources):
            source = self.kept.get(rid)
            if source is None or source.expiring:
                return (f"{JOIN_PREFIX}.sources[{i}] = {rid!r} is not a kept request: unknown, not finished yet, sent "
                        f"without {KEEP_KEY}, aborted, already released by an earlier join, or expired")
            if source.namespace != (req.extra_key, req.cache_salt):
                return (f"{JOIN_PREFIX}.sources[{i}] = {rid!r} was cached under another extra_key / cache_salt / LoRA "
                        "adapter than this request")
            sources.append(source)
        if spec.prompt_len is None:
            p = len(sources[0].tokens) if len(sources) == 1 else _common_prefix_len([s.tokens for s in sources])
        else:
            p = spec.prompt_len
            for i, source in enumerate(sources):
                if len(source.tokens) < p:
                    return (f"{JOIN_PREFIX}.prompt_len = {p} is longer than sources[{i}] = {source.rid!r}, "
                            f"which holds {len(source.tokens)} tokens")
            at = _common_prefix_len([s.tokens for s in sources])
            if at < p:
                i = next(i for i, s in enumerate(sources) if s.tokens[at] != sources[0].tokens[at])
                return (f"{JOIN_PREFIX}.sources[{i}] = {spec.sources[i]!r} does not share the first {p} tokens "
                        f"(prompt_len) with sources[0]: they differ at token {at}")
        part_lens = [len(s.tokens) - p for s in sources]
        total = p + sum(part_lens) + len(req.origin_input_ids)
        limit = self.scheduler.max_req_input_len
        if total >= limit:
            return (f"{JOIN_PREFIX}: prompt ({p}) + the sources' parts ({sum(part_lens)}: "
                    + ", ".join(f"{rid!r} {n}" for rid, n in zip(spec.sources, part_lens))
                    + f") + this request's {len(req.origin_input_ids)} tokens = {total} tokens, more than this "
                    f"server's longest input ({limit - 1}): join fewer or shorter sources")
        delta = sum(part_lens) - max(part_lens) if spec.positions == "after_longest" else 0
        return Join(sources, p, part_lens, delta, spec.release_sources)

    def attach(self, req, join: Join) -> None:
        """Rewrite the request as prompt + parts + continuation, claimed from the pins."""
        new = req.origin_input_ids
        tokenizer = getattr(req, "tokenizer", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and len(new) > 1 and new[0] == bos and join.sources[0].tokens[:1] == array("q", [bos]):
            new = new[1:]  # a text continuation tokenized with the model's BOS: it is not in the middle
        first = join.sources[0].tokens
        joined = array("q", first[: join.prompt_len])
        for source, n in zip(join.sources, join.part_lens):
            joined.extend(source.tokens[join.prompt_len: join.prompt_len + n])
        joined.extend(new)
        req.origin_input_ids = joined
        req.origin_input_ids_unpadded = joined
        req.full_untruncated_fill_ids = array("q")
        req.skip_radix_cache_insert = True
        req._sgl_join = join
        for source in join.sources:
            source.holders.add(req)

    def finish(self, req) -> None:
        """A join request released its row for good: drop its hold on the sources."""
        join = req._sgl_join
        if join.released:
            return
        join.released = True
        for source in join.sources:
            source.holders.discard(req)
            if join.release_sources and self.kept.get(source.rid) is source:
                self.release(source.rid)

    # ---------------------------------------------------------------- positions

    def set_row_delta(self, row: int, delta: int, device) -> None:
        import torch

        if self.position_delta is None:
            size = self.scheduler.req_to_token_pool.req_to_token.shape[0]
            self.position_delta = torch.zeros(size, dtype=torch.int64, device=device)
        if row not in self.delta_rows:
            self.position_delta[row] = delta
            self.delta_rows.add(row)

    def clear_row_delta(self, row: int) -> None:
        if row in self.delta_rows:
            self.position_delta[row] = 0
            self.delta_rows.discard(row)


def _common_prefix_len(seqs) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def bad_request(req, message: str) -> None:
    req.set_finish_with_abort(message, status_code=HTTPStatus.BAD_REQUEST)

"""The KV join in the scheduler: a request that starts from the concatenated KV of earlier
sequences. Its two request fields, `sgl_merge_keep` (keep this request's KV for a later join) and
`sgl_merge_join` (run after prompt + the sources' parts), and their parsing are
`sgl_merge.contract.join`.

Why it is exact and leaves the cache sound: each part's KV was computed attending to the prompt
and that part only, which is the join's definition; the joined sequence is no sequential
computation, so it never enters the radix cache (`skip_radix_cache_insert`) and its prefix is
claimed from the pins, never matched, so an unrelated request that sends the same tokens gets a
plain computation. The sources' own sequences (prompt + part_i) stay in the cache: they are
sequential.

Ownership: a kept source is found by (owner, rid), so a join or release without the owner gets the
answer an unknown rid gets (nothing tells whether the rid exists), and two clients that keep the
same rid keep two sources.

Budget: kept KV is memory no other request can use. A keep is refused (429) at arrival when its
prompt + max_new_tokens, with what is kept and reserved already, would pass
SGLANG_MERGE_KEEP_MAX_TOKENS (default: half the KV cache), or when its owner already holds
SGLANG_MERGE_KEEP_MAX_PER_OWNER sources (default 256, what one join may read). Nothing kept is reclaimed early: sources
leave by a join's `release_sources`, `/sgl_merge/release`, or their TTL.

Lifecycle: a kept source is a lock on its radix-tree leaf; a join holds it from arrival until it
ends, however it ends. `JoinRegistry.ended` is the one place a request lets go: SGLang calls it
(through the plugin's hooks) when a finished request's KV is released and when it ends a request
outside the output stream (aborted while queued, retracted and aborted, refused on arrival). There
a join drops its holds (and with `release_sources` its sources) and a keep its reservation.
Expiry goes through SGLang's broadcast abort path so every tensor-parallel rank unlocks the same
node in the same iteration, and so does an early release (`POST /sgl_merge/release {"rids": [...],
"owner": ...}`), which also cancels a keep that has not finished yet; `/flush_cache` (only
possible when idle) forgets all pins with the tree.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import weakref
from array import array
from dataclasses import dataclass, field
from http import HTTPStatus

from sgl_merge.contract.join import (JOIN_PREFIX, KEEP_KEY, KEEP_PREFIX, MAX_SOURCES, JoinSpec, KeepSpec, parse_join,
                                     parse_keep)
from sgl_merge.contract.merge import MergeSpecError
from sgl_merge.envs import count

logger = logging.getLogger("sgl_merge")

RELEASE_RID = "sgl-merge-release:"  # aborts aimed at a kept source (expiry, /sgl_merge/release), not at a request
MAX_TOKENS_ENV = "SGLANG_MERGE_KEEP_MAX_TOKENS"
MAX_PER_OWNER_ENV = "SGLANG_MERGE_KEEP_MAX_PER_OWNER"
DEFAULT_MAX_PER_OWNER = MAX_SOURCES  # one owner can always keep what one join reads
OWNER_HINT = (f"present the owner it was kept under ({JOIN_PREFIX}.owner: the {KEEP_KEY}.owner you sent, or "
              f"meta_info.{KEEP_KEY}.owner of the keep's response)")


# ------------------------------------------------------------------ the tokenizer process


def verify(params) -> None:
    """Tokenizer-side validation of both fields of a SamplingParams (a 400 naming the field). A keep
    without an owner gets one made up here, written into the request's own custom_params, so every
    scheduler rank sees the same owner and the response can answer it (`JoinRegistry.keep`)."""
    keep = parse_keep(params.custom_params)
    if keep is not None and keep.owner is None:
        entry = params.custom_params[KEEP_KEY]
        params.custom_params[KEEP_KEY] = {**(entry if isinstance(entry, dict) else {}),
                                          "owner": secrets.token_urlsafe(18)}
    if parse_join(params.custom_params) is not None and (params.n or 1) > 1:
        raise MergeSpecError("sampling_params.n", f"sampling_params.n = {params.n} cannot be combined with "
                             f"{JOIN_PREFIX}: send n join requests (each one a join of the same sources, with "
                             "release_sources false)")


def release_rid(owner: str, rid: str) -> str:
    """The rid of the abort that releases (owner, rid) on every rank (see `hooks.abort`)."""
    return RELEASE_RID + json.dumps([owner, rid])


def parse_release_rid(abort_rid: str) -> tuple[str, str] | None:
    try:
        owner, rid = json.loads(abort_rid[len(RELEASE_RID):])
    except (ValueError, TypeError):
        return None
    return (owner, rid) if isinstance(owner, str) and isinstance(rid, str) else None


# ------------------------------------------------------------------ the scheduler's state


@dataclass(eq=False)
class KeptSource:
    """A finished request's KV, locked in the radix tree: `tokens` are what its path holds."""

    rid: str
    owner: str
    lock: object
    node: object
    tokens: array
    namespace: tuple
    deadline: float
    holders: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # joins reading this KV
    expiring: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.rid

    def held(self) -> bool:
        return len(self.holders) > 0  # a join leaves in JoinRegistry.ended, or when it is gone


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
    """Kept sources, keeps on their way and live joins of one scheduler process."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.kept: dict[tuple[str, str], KeptSource] = {}  # (owner, rid) -> source
        # Keep requests admitted and not ended yet (id -> Req), each reserving prompt + max_new_tokens
        # of the budget; weak, so a request SGLang forgot by a path no hook sees cannot hold it.
        self.pending: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.max_tokens = count(MAX_TOKENS_ENV, scheduler.max_total_num_tokens // 2)
        self.max_per_owner = count(MAX_PER_OWNER_ENV, DEFAULT_MAX_PER_OWNER)
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

    def kept_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.kept.values())

    def reserved_tokens(self) -> int:
        return sum(len(r.origin_input_ids) + (r.sampling_params.max_new_tokens or 0) for r in self.pending.values())

    def budget(self) -> dict:
        """What `/server_info` shows of the kept-KV budget."""
        return {"sources": len(self.kept), "owners": len({s.owner for s in self.kept.values()}),
                "tokens": self.kept_tokens(), "reserved_tokens": self.reserved_tokens(),
                "max_tokens": self.max_tokens, "max_sources_per_owner": self.max_per_owner,
                "pending_keeps": len(self.pending)}

    def admit_keep(self, req, keep: KeepSpec) -> str | None:
        """Reserve the budget for a keep request that just arrived (its max_new_tokens capped), or say
        why it cannot be kept (a 429 message). Decided from state every rank shares, so every rank
        decides alike."""
        # An owner the tokenizer did not fill in (not possible through the HTTP server) is a secret
        # nobody knows: the source is unreachable and leaves at its TTL.
        owner = keep.owner or secrets.token_urlsafe(18)
        need = len(req.origin_input_ids) + (req.sampling_params.max_new_tokens or 0)
        # A keep of a (owner, rid) kept already replaces it (a client retrying a batch): not counted twice.
        replaced = self.kept.get((owner, req.rid))
        used = self.kept_tokens() + self.reserved_tokens() - (len(replaced.tokens) if replaced else 0)
        if used + need > self.max_tokens:
            return (f"{KEEP_PREFIX}: keeping this request could lock {need} KV tokens (prompt + max_new_tokens), and "
                    f"{used} of the server's {self.max_tokens} for kept requests are kept or reserved "
                    f"({MAX_TOKENS_ENV}); release sources you no longer need (POST /sgl_merge/release), lower "
                    "max_new_tokens or a ttl_s, or retry later")
        held = sum(s.owner == owner for s in self.kept.values()) - (replaced is not None) + sum(
            r._sgl_keep.owner == owner for r in self.pending.values())
        if held >= self.max_per_owner:
            return (f"{KEEP_PREFIX}.owner already holds {held} kept or pending sources, the most one owner may hold "
                    f"({MAX_PER_OWNER_ENV}); release some (POST /sgl_merge/release) or retry later")
        req._sgl_keep = KeepSpec(keep.ttl_s, owner)
        self.pending[id(req)] = req
        return None

    def keep(self, req) -> dict | None:
        """Lock a finished keep request's radix-tree leaf (called right after SGLang checkpointed it);
        the source's owner, TTL and tokens for the response, None if it was not kept."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        spec = getattr(req, "_sgl_keep", None)
        if (spec is None or isinstance(req.finished_reason, FINISH_ABORT) or self.refusal() is not None
                or req.last_node is None):
            return None
        tree = self.scheduler.tree_cache
        n = len(tree.path_device_indices(req.last_node))
        if n < len(req.origin_input_ids) + len(req.output_ids) - 1:
            logger.warning("sgl-merge: request %s is not kept: only %d of its tokens are in the radix cache",
                           req.rid, n)
            return None
        self.drop((spec.owner, req.rid))
        source = KeptSource(
            rid=req.rid, owner=spec.owner, lock=tree.lock(req.last_node), node=req.last_node,
            tokens=array("q", req.full_untruncated_fill_ids[:n]), namespace=(req.extra_key, req.cache_salt),
            deadline=time.monotonic() + spec.ttl_s)
        self.kept[source.key] = source
        return {"owner": spec.owner, "ttl_s": spec.ttl_s, "kept_tokens": n}

    def ended(self, req) -> None:
        """The one place a request lets go of what it holds here, however it ended: called when a
        finished request's KV is released and whenever SGLang ends a request outside its output
        stream (aborted while queued, retracted and aborted, refused). A keep gives back its
        reservation (it was kept just before, if it finished well); a join stops holding its
        sources and, with `release_sources`, releases them. A request whose row is still held is
        not over yet (SGLang releases the row next, which calls this again); calling twice is
        harmless."""
        if req.kv.holds_kv:
            return
        self.pending.pop(id(req), None)
        join = getattr(req, "_sgl_join", None)
        if join is None or join.released:
            return
        join.released = True
        for source in join.sources:
            source.holders.discard(req)
            if join.release_sources and self.kept.get(source.key) is source:
                self.release(source.key)

    def _unlock(self, source: KeptSource) -> None:
        self.scheduler.tree_cache.unlock(source.lock)

    def drop(self, key: tuple[str, str]) -> None:
        source = self.kept.pop(key, None)
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
                aborts.append(AbortReq(rid=release_rid(*source.key)))
        return aborts

    def release(self, key: tuple[str, str]) -> None:
        """Let go of the source (owner, rid) (its expiry, or a client's release): at once, or when the
        last join reading it ends. A keep of that rid and owner still on its way is not kept."""
        for req in list(self.pending.values()):
            if (req.rid, req._sgl_keep.owner) == (key[1], key[0]):
                req._sgl_keep = None
                self.pending.pop(id(req), None)
        source = self.kept.get(key)
        if source is None:
            return
        source.deadline = 0.0
        if not source.held():
            self.drop(key)

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
        for i, (rid, owner) in enumerate(zip(spec.sources, spec.owners)):
            source = self.kept.get((owner, rid))
            if source is None or source.expiring:
                return (f"{JOIN_PREFIX}.sources[{i}] = {rid!r} is not a source this request may join: unknown, not "
                        f"finished yet, sent without {KEEP_KEY}, kept under another owner, aborted, released or "
                        f"expired; {OWNER_HINT}")
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


def refuse(req, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
    req.set_finish_with_abort(message, status_code=status)

"""Merge groups in the scheduler: arrival, gang admission, retraction, aborts, timeouts.

A merge group is K requests that must decode in lockstep: they enter one prefill batch together
(all K arrived, none chunked), are retracted together, and finish together. The scheduler knows
nothing of groups; these hooks make it keep them whole:

- `_add_request_to_queue` registers members (and re-queued, retracted members).
- `_get_new_batch_prefill_raw` hides members of incomplete groups from the waiting queue and
  checks afterwards that no group was split; `_poll_timeout_aborts` aborts groups that stay
  incomplete too long (decided on one rank, broadcast by SGLang to all).
- `SchedulePolicy.calc_priority` keeps each group's members adjacent in the queue, and
  `PrefillAdder.add_one_req` admits the first member only when the whole group fits.
- `ScheduleBatch.retract_decode` retracts the rest of any group one of whose members was retracted.
- `abort_request` fans an abort of one member out to the whole group (members matched by exact rid).

A group that cannot be kept whole is finished, every member with the same reason naming the group.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus

from sgl_merge.contract.merge import MemberSpec, first_mismatch, sampling_signature
from sgl_merge.envs import seconds

logger = logging.getLogger("sgl_merge")

DEFAULT_GROUP_TIMEOUT_S = 30.0
TIMEOUT_ENV = "SGLANG_MERGE_GROUP_TIMEOUT"
# Rids no request has (SGLang matches abort rids as prefixes; no rid starts with NUL): members carry
# PROTECTED while an abort must not reach them, and a group's timeout abort is aimed at TIMEOUT_RID.
PROTECTED = "\x00sgl-merge-protected:"
TIMEOUT_RID = "\x00sgl-merge-group-timeout:"

# Server features under which members cannot stay in lockstep (server args).
# Each is read where SGLang itself decides: mixed chunking is on only with chunked prefill.
LOCKSTEP_BREAKERS = [
    (lambda sched, args: getattr(args, "speculative_algorithm", None) not in (None, "NONE"),
     "speculative decoding (--speculative-algorithm)"),
    (lambda sched, args: (getattr(args, "pp_size", None) or 1) > 1, "pipeline parallelism (--pp-size > 1)"),
    (lambda sched, args: bool(getattr(sched, "is_mixed_chunk", False)), "mixed chunked prefill (--enable-mixed-chunk)"),
]
# ... and scheduler state that can change while the server runs: hierarchical-cache storage can be
# attached later, and its prefetches skip members one at a time during admission.
RUNTIME_BREAKERS = {
    "enable_hicache_storage": "hierarchical-cache storage prefetch (--hicache-storage-backend)",
    "enable_lmcache": "LMCache (--enable-lmcache)",
}


def member_spec(req) -> MemberSpec | None:
    return getattr(req, "_sgl_merge", None)


@dataclass
class Group:
    key: str
    size: int
    mode: str
    tau: float
    members: list = field(default_factory=list)  # Req objects, arrival order
    waiting: set = field(default_factory=set)  # rids currently in the waiting queue
    first_arrival: float = field(default_factory=time.monotonic)
    signature: dict | None = None
    requested_max_new: object = None
    lora_id: str | None = None
    dead: bool = False
    expiring: bool = False  # its timeout abort was sent

    def complete(self) -> bool:
        return len(self.members) == self.size

    def ready(self) -> bool:
        """All K members arrived and all of them wait for (re-)admission."""
        return self.complete() and len(self.waiting) == self.size


class GroupRegistry:
    """The merge groups one scheduler knows about (one per scheduler process / DP rank)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.groups: dict[str, Group] = {}
        self.timeout_s = seconds(TIMEOUT_ENV, DEFAULT_GROUP_TIMEOUT_S)
        args = scheduler.server_args
        self.static_breakers = [why for applies, why in LOCKSTEP_BREAKERS if applies(scheduler, args)]
        if getattr(scheduler, "enable_priority_preemption", False):
            # Preemption evicts running requests one by one until a new one fits: part of a group.
            self.static_breakers.append("priority preemption (--enable-priority-scheduling; add "
                                        "--disable-priority-preemption to keep priority scheduling)")
        # Admission limits a group must fit as a whole (None: no limit).
        self.max_queued = getattr(scheduler, "max_queued_requests", None)
        from sglang.srt.runtime_context import get_schedule

        self.prefill_max_requests = get_schedule().prefill_max_requests
        self.max_running = scheduler.max_running_requests
        self.max_total_tokens = scheduler.max_total_num_tokens
        self.allocatable = 0  # set for the duration of one admission pass
        self.hidden: list = []  # members of incomplete groups kept out of that pass
        # Groups to finish once the admission pass is over: finishing edits the waiting queue,
        # which SGLang's admission loop is iterating.
        self.deferred: list[tuple[Group, str, int]] = []
        # Recently finished group ids, so a late member is refused at once instead of waiting.
        self.finished_keys: dict[str, str] = {}

    # ---------------------------------------------------------------- finishing

    def finish(self, group: Group, message: str, status: int) -> None:
        """End every unfinished member of `group` with `message`, waiting or running."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        sched = self.scheduler
        group.dead = True
        self.groups.pop(group.key, None)
        self._remember_finished(group.key, message)
        reason = FINISH_ABORT(message, status)
        members = {id(m) for m in group.members}
        queued = {id(r) for r in sched.waiting_queue + self.hidden if id(r) in members}
        if queued:
            sched.waiting_queue = [r for r in sched.waiting_queue if id(r) not in queued]
            self.hidden = [r for r in self.hidden if id(r) not in queued]
        for req in group.members:
            if req.finished():
                continue
            if id(req) in queued:
                self._send_abort(req, reason)
                req.finished_reason = reason
            elif req.rid not in group.waiting:  # running: finishes at its next step
                req.to_finish = reason
        group.waiting.clear()
        logger.warning("sgl-merge: %s", message)

    def _remember_finished(self, key: str, message: str) -> None:
        self.finished_keys[key] = message
        while len(self.finished_keys) > 4096:
            self.finished_keys.pop(next(iter(self.finished_keys)))

    def reject(self, req, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        """Refuse a request before it is queued."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        self._send_abort(req, FINISH_ABORT(message, status))
        logger.warning("sgl-merge: %s", message)

    def _send_abort(self, req, reason) -> None:
        """End a request that is not running: release its cache state, answer the client."""
        from sglang.srt.managers.scheduler import _make_abort_req

        self.scheduler._release_aborted_request(req)
        self.scheduler.send_abort_output(_make_abort_req(req, finished_reason=reason.to_json()), req)

    # ---------------------------------------------------------------- arrival

    def breakers(self) -> list[str]:
        """What on this server keeps members from decoding in lockstep (empty: nothing)."""
        return self.static_breakers + [why for name, why in RUNTIME_BREAKERS.items()
                                       if getattr(self.scheduler, name, False)]

    def on_queue(self, req, is_retracted: bool) -> bool:
        """Register `req` (a member). False when it was refused and must not be queued."""
        spec = member_spec(req)
        group = self.groups.get(spec.group)
        if group is not None and any(m is req for m in group.members):
            # A member queued again without SGLang saying so: /pause_generation (mode "retract")
            # re-queues every running request as if it were new.
            is_retracted = True
        if is_retracted:
            if group is None or group.dead:
                self.reject(req, f"merge group {spec.group!r} was finished while this member was retracted",
                            HTTPStatus.SERVICE_UNAVAILABLE)
                return False
            group.waiting.add(req.rid)
            return True
        prefix = f"merge group {spec.group!r}"
        if breakers := self.breakers():
            self.reject(req, f"{prefix}: merging cannot keep members in lockstep with {' and '.join(breakers)}; "
                             "start the server without it to use sgl_merge")
            return False
        for limit, flag, what in ((self.max_running, "--max-running-requests", "running requests"),
                                  (self.max_queued, "--max-queued-requests", "queued requests"),
                                  (self.prefill_max_requests, "--prefill-max-requests", "requests in one prefill batch")):
            if limit is not None and spec.size > limit:
                self.reject(req, f"{prefix}: size {spec.size} exceeds the server's limit of {limit} {what} "
                                 f"({flag}); use a smaller size")
                return False
        if group is None and spec.group in self.finished_keys:
            self.reject(req, f"{prefix} has already finished ({self.finished_keys[spec.group]}); "
                             "group ids must be unique to one merge")
            return False
        if (failure := req.to_finish or req.finished_reason) is not None:
            # SGLang failed it on arrival (its grammar did not compile, its prompt is too long, ...):
            # it answers with its own reason, and the rest of the group cannot merge without it.
            why = getattr(failure, "message", None) or "it was aborted"
            status = getattr(failure, "status_code", None) or HTTPStatus.BAD_REQUEST
            self.reject(req, why, status)
            message = f"{prefix} finished: member {req.rid!r} failed before it could run: {why}"
            if group is not None:
                self.finish(group, message, status)
            else:
                self._remember_finished(spec.group, message)
            return False
        signature = sampling_signature(req.sampling_params)
        if group is None:
            group = self.groups[spec.group] = Group(spec.group, spec.size, spec.mode, spec.tau, signature=signature,
                                                    requested_max_new=req._sgl_merge_requested_max_new,
                                                    lora_id=getattr(req, "lora_id", None))
        mismatch = None
        if spec.size != group.size:
            mismatch = f"members disagree on sampling_params.custom_params.sgl_merge.size ({group.size} vs {spec.size})"
        elif spec.mode != group.mode:
            mismatch = f"members disagree on sampling_params.custom_params.sgl_merge.mode ({group.mode!r} vs {spec.mode!r})"
        elif spec.tau != group.tau:
            mismatch = f"members disagree on sampling_params.custom_params.sgl_merge.tau ({group.tau} vs {spec.tau})"
        elif req._sgl_merge_requested_max_new != group.requested_max_new:
            mismatch = "members disagree on sampling_params.max_new_tokens"
        elif (name := first_mismatch(group.signature, signature)) is not None:
            mismatch = f"members disagree on sampling_params.{name}"
        elif getattr(req, "lora_id", None) != group.lora_id:
            mismatch = "members disagree on lora_path (one token is sampled for all: one model, one adapter)"
        elif len(group.members) >= group.size:
            mismatch = f"more than {group.size} requests use this group id; group ids must be unique to one merge"
        elif any(m.rid == req.rid for m in group.members):
            mismatch = f"two members share the request id {req.rid!r}"
        if mismatch:
            self.reject(req, f"{prefix}: {mismatch}; all members must carry identical sampling parameters (except weight)")
            self.finish(group, f"{prefix} finished: a member was rejected because {mismatch}", HTTPStatus.BAD_REQUEST)
            return False
        group.members.append(req)
        group.waiting.add(req.rid)
        if group.complete():
            self._on_complete(group)
        return not group.dead

    def _on_complete(self, group: Group) -> None:
        needed = sum(len(m.origin_input_ids) for m in group.members)
        if needed > self.max_total_tokens:
            self.finish(group, f"merge group {group.key!r} needs {needed} KV tokens for its prompts, more than the "
                               f"server's KV cache holds ({self.max_total_tokens}, --max-total-tokens)",
                        HTTPStatus.BAD_REQUEST)
            return
        # Equalise the context-length caps: no member stops early because its context is longer.
        cap = min(m.sampling_params.max_new_tokens for m in group.members)
        for m in group.members:
            m.sampling_params.max_new_tokens = cap

    # ---------------------------------------------------------------- admission

    def timeout_aborts(self) -> list:
        """Aborts for the groups still incomplete after the timeout, one per group (aimed at no
        request: `on_abort` ends the group's members). Called on the scheduler rank that polls SGLang's
        own timeouts: SGLang broadcasts these aborts with the requests, so every tensor-parallel
        rank ends the same groups in the same iteration, whatever its own clock says."""
        from sglang.srt.managers.io_struct import AbortReq

        now, aborts = time.monotonic(), []
        for group in self.groups.values():
            if group.complete() or group.expiring or now - group.first_arrival <= self.timeout_s:
                continue
            group.expiring = True
            message = (f"merge group {group.key!r} timed out: only {len(group.members)} of {group.size} "
                       f"members arrived within {self.timeout_s:g} s ({TIMEOUT_ENV}); behind a gateway, send a "
                       "group in one request or give all its members one X-SMG-Routing-Key header")
            aborts.append(AbortReq(rid=TIMEOUT_RID + group.key, finished_reason={
                "type": "abort", "status_code": HTTPStatus.REQUEST_TIMEOUT, "message": message}))
        return aborts

    def forget_finished(self) -> None:
        for group in list(self.groups.values()):
            if group.complete() and all(m.finished() for m in group.members):
                self.groups.pop(group.key, None)

    def is_held_back(self, req) -> bool:
        spec = member_spec(req)
        if spec is None:
            return False
        group = self.groups.get(spec.group)
        return group is None or not group.ready()

    def make_adjacent(self, queue: list) -> list:
        """`queue` with each group's members moved up behind its first member (order kept otherwise)."""
        out, placed = [], set()
        by_group: dict[str, list] = {}
        for r in queue:
            if (spec := member_spec(r)) is not None:
                by_group.setdefault(spec.group, []).append(r)
        for r in queue:
            spec = member_spec(r)
            if spec is None:
                out.append(r)
            elif spec.group not in placed:
                placed.add(spec.group)
                out.extend(by_group[spec.group])
        return out

    def group_fits(self, adder, req) -> object | None:
        """None if the whole group of `req` (its first member in this pass) fits into this prefill
        batch unchunked; otherwise the AddReqResult that makes the group wait."""
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, AddReqResult

        group = self.groups[member_spec(req).group]
        if len(adder.can_run_list) + group.size > self.allocatable:
            return AddReqResult.NO_TOKEN
        if self.prefill_max_requests is not None and len(adder.can_run_list) + group.size > self.prefill_max_requests:
            return AddReqResult.OTHER
        for m in group.members:
            if m is not req:
                m.init_next_round_input(self.scheduler.tree_cache)
        if adder.rem_mamba_slots is not None:  # hybrid models: one state slot per member
            slots = sum(adder._mamba_gap_budget_for_req(m, include_host_hit=True) for m in group.members)
            if slots // adder._mamba_slot_cost > adder.rem_mamba_slots:
                return AddReqResult.NO_TOKEN
        alone = not adder.can_run_list and self.scheduler.running_batch.is_empty()
        extends = [len(m.full_untruncated_fill_ids) - m.prefix_len for m in group.members]
        rem_input, rem_chunk = adder.rem_input_tokens, adder.rem_chunk_tokens
        for i, ext in enumerate(extends):
            tokens = adder.ceil_paged_tokens(ext)
            if (rem_chunk is not None and tokens > rem_chunk) or (
                i + len(adder.can_run_list) > 0 and rem_chunk is None and tokens >= rem_input
            ):
                if not adder.can_run_list:
                    limit = self.scheduler.chunked_prefill_size or self.scheduler.max_prefill_tokens
                    self.deferred.append((group, f"merge group {group.key!r} needs {sum(extends)} uncached prompt tokens in one "
                                       f"prefill batch, more than the server allows ({limit}, --chunked-prefill-size / "
                                       "--max-prefill-tokens); raise the limit or shorten the prompts",
                                          HTTPStatus.BAD_REQUEST))
                return AddReqResult.OTHER
            rem_input -= tokens
            rem_chunk = None if rem_chunk is None else rem_chunk - tokens
        # What admitting each member charges the budget (PrefillAdder._update_prefill_budget): the
        # paged extend and the whole max_new_tokens, also for a retracted member whose check counts
        # only the tokens it has left. The sum of the checks would let the last members run short.
        total = sum(
            adder.ceil_paged_tokens(e) + min(m.sampling_params.max_new_tokens, CLIP_MAX_NEW_TOKENS)
            + adder.per_req_token_overhead
            for e, m in zip(extends, group.members)
        )
        # Admitting a member locks its cached prefix, which then no longer counts as evictable: pin
        # every member's prefix for the check (as SGLang pins the one request it checks), or the
        # last members can find the budget gone although the group "fit".
        with ExitStack() as pins:
            for m in group.members:
                pins.enter_context(adder._lock_node(m.last_node))
            can_admit, _ = adder._check_prefill_budget(
                req, extend_input_len=sum(extends), total_tokens=total, swa_host_hit_length=0,
                chunk_limit=adder.rem_chunk_tokens,
            )
        if not can_admit:
            if alone:
                self.deferred.append((group, f"merge group {group.key!r} needs {total} KV tokens at once, more than "
                                             "the server has free with nothing else running (--max-total-tokens); use "
                                             "a smaller group, shorter prompts or a smaller max_new_tokens",
                                      HTTPStatus.BAD_REQUEST))
                return AddReqResult.OTHER
            return AddReqResult.NO_TOKEN
        return None

    def after_admission(self, new_batch, chunked_req) -> None:
        """Mark admitted members running; finish the groups found unadmittable during the pass,
        and any group the adder split (must not happen)."""
        for group, message, status in self.deferred:
            self.finish(group, message, status)
        self.deferred = []
        admitted: dict[str, list] = {}
        for r in new_batch.reqs if new_batch is not None else []:
            if (spec := member_spec(r)) is not None:
                admitted.setdefault(spec.group, []).append(r)
        for key, reqs in admitted.items():
            group = self.groups.get(key)
            if group is None:
                continue
            for r in reqs:
                group.waiting.discard(r.rid)
            if len(reqs) != group.size or any(r is chunked_req for r in reqs):
                self.finish(group, f"merge group {key!r} lost lockstep: the scheduler admitted {len(reqs)} of "
                                   f"{group.size} members (internal error; please report)",
                            HTTPStatus.INTERNAL_SERVER_ERROR)

    # ---------------------------------------------------------------- retraction and aborts

    def retract_rest(self, batch, retracted: list, aborted: list) -> None:
        """After SGLang retracted some requests: take the rest of their groups out of `batch` too."""
        hit = {member_spec(r).group for r in retracted + aborted if member_spec(r) is not None}
        if not hit:
            return
        rest = [i for i, r in enumerate(batch.reqs) if member_spec(r) is not None and member_spec(r).group in hit]
        if not rest:
            return
        leaving = set(rest)
        keep = [i for i in range(len(batch.reqs)) if i not in leaving]
        failed = {member_spec(r).group for r in aborted if member_spec(r) is not None}
        for i in rest:
            req = batch.reqs[i]
            key = member_spec(req).group
            if key in failed:
                batch.release_req(i, len(keep), offload_kv=False)
                aborted.append(req)
            elif batch.release_req(i, len(keep)):
                retracted.append(req)
            else:  # SGLang could not keep its KV: the group cannot resume
                failed.add(key)
                aborted.append(req)
        batch.filter_batch(keep_indices=keep)
        for key in failed:
            if (group := self.groups.get(key)) is not None:
                self.finish(group, f"merge group {key!r} finished: a member was aborted under KV-cache pressure",
                            HTTPStatus.SERVICE_UNAVAILABLE)
        # Every aborted request needs a reason for the scheduler's abort output.
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        for req in aborted:
            if req.to_finish is None:
                req.to_finish = FINISH_ABORT("merge group aborted under KV-cache pressure", HTTPStatus.SERVICE_UNAVAILABLE)

    def protected_from(self, recv_req) -> list:
        """The members (and would-be members whose grammar still compiles) that SGLang's prefix
        match of `recv_req.rid` would abort although their rid is not `recv_req.rid`: a user rid
        that is a prefix of another call's rid must not end that call's group."""
        rid = recv_req.rid or ""
        if recv_req.abort_all or not rid or rid.startswith("\x00"):
            return []
        grammar_queue = getattr(self.scheduler.grammar_manager, "grammar_queue", [])
        candidates = [m for g in self.groups.values() for m in g.members]
        candidates += [r for r in grammar_queue if getattr(r, "_sgl_merge_requested_max_new", None) is not None]
        return [r for r in candidates if r.rid != rid and r.rid.startswith(rid)]

    def on_abort(self, recv_req) -> None:
        """An abort reached some members: finish their whole groups. The abort's own reason (a
        timeout, a client's message) becomes the group's."""
        rid = recv_req.rid or ""
        reason = recv_req.finished_reason or {}
        if rid.startswith(TIMEOUT_RID):
            if (group := self.groups.get(rid[len(TIMEOUT_RID):])) is not None:
                self.finish(group, reason["message"], reason["status_code"])
            return
        for group in list(self.groups.values()):
            hit = [m.rid for m in group.members if recv_req.abort_all or m.rid == rid]
            if not hit:
                continue
            why = reason.get("message") or recv_req.abort_message
            self.finish(group, f"merge group {group.key!r} aborted: member {hit[0]!r} was aborted"
                               + (f" ({why})" if why else ""), reason.get("status_code") or HTTPStatus.BAD_REQUEST)

    @contextmanager
    def dropped_members(self):
        """Within: the members SGLang ends outside its output stream (`send_abort_output`) end
        their groups with SGLang's reason once the block is over."""
        sched, dropped = self.scheduler, []

        def send_abort_output(abort_req, req, _send=sched.send_abort_output):
            if member_spec(req) is not None:
                dropped.append((req, abort_req.finished_reason))
            return _send(abort_req, req)

        sched.send_abort_output = send_abort_output
        try:
            yield
        finally:
            del sched.send_abort_output
        for req, reason in dropped:
            self.on_dropped(req, reason)

    def on_dropped(self, req, reason: dict | None) -> None:
        """SGLang ended `req` (a member) while queueing it or another request (its queue limit, its
        priority checks, eviction by a higher-priority arrival): the group cannot merge without it."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        reason = reason or {}
        why = reason.get("message") or "it was dropped by the scheduler"
        status = reason.get("status_code") or HTTPStatus.SERVICE_UNAVAILABLE
        req.finished_reason = FINISH_ABORT(why, status)  # SGLang has answered it already
        group = self.groups.get(member_spec(req).group)
        if group is not None and not group.dead:
            self.finish(group, f"merge group {group.key!r} finished: member {req.rid!r} was dropped by the "
                               f"scheduler: {why}", status)

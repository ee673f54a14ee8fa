"""Merge groups in the scheduler: arrival, gang admission, retraction, aborts, timeouts.

A merge group is K requests that must decode in lockstep: they enter one prefill batch together
(all K arrived, none chunked), are retracted together, and finish together. The scheduler knows
nothing of groups; these hooks make it keep them whole:

- `_add_request_to_queue` registers members (and re-queued, retracted members).
- `_get_new_batch_prefill_raw` hides members of incomplete groups from the waiting queue, expires
  groups that stay incomplete too long, and checks afterwards that no group was split.
- `SchedulePolicy.calc_priority` keeps each group's members adjacent in the queue, and
  `PrefillAdder.add_one_req` admits the first member only when the whole group fits.
- `ScheduleBatch.retract_decode` retracts the rest of any group one of whose members was retracted.
- `abort_request` fans an abort of one member out to the whole group.

A group that cannot be kept whole is finished, every member with the same reason naming the group.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from http import HTTPStatus

from sgl_merge.envs import seconds
from sgl_merge.runtime.spec import MemberSpec, first_mismatch, sampling_signature

logger = logging.getLogger("sgl_merge")

DEFAULT_GROUP_TIMEOUT_S = 30.0
TIMEOUT_ENV = "SGLANG_MERGE_GROUP_TIMEOUT"

# Server features under which members cannot stay in lockstep.
LOCKSTEP_BREAKERS = {
    "speculative_algorithm": "speculative decoding (--speculative-algorithm)",
    "pp_size": "pipeline parallelism (--pp-size > 1)",
    "enable_mixed_chunk": "mixed chunked prefill (--enable-mixed-chunk)",
}


def member_spec(req) -> MemberSpec | None:
    return getattr(req, "_sgl_merge", None)


@dataclass
class Group:
    key: str
    size: int
    mode: str
    members: list = field(default_factory=list)  # Req objects, arrival order
    waiting: set = field(default_factory=set)  # rids currently in the waiting queue
    first_arrival: float = field(default_factory=time.monotonic)
    signature: dict | None = None
    requested_max_new: object = None
    dead: bool = False

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
        self.breaker = next(
            (why for name, why in LOCKSTEP_BREAKERS.items()
             if (getattr(args, name, None) not in (None, False, 0, 1, "NONE"))),
            None,
        )
        if self.breaker is None and getattr(scheduler, "enable_priority_preemption", False):
            # Preemption evicts running requests one by one until a new one fits: part of a group.
            self.breaker = ("priority preemption (--enable-priority-scheduling; add --disable-priority-preemption "
                            "to keep priority scheduling)")
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

    def on_queue(self, req, is_retracted: bool) -> bool:
        """Register `req` (a member). False when it was refused and must not be queued."""
        spec = member_spec(req)
        group = self.groups.get(spec.group)
        if is_retracted:
            if group is None or group.dead:
                self.reject(req, f"merge group {spec.group!r} was finished while this member was retracted",
                            HTTPStatus.SERVICE_UNAVAILABLE)
                return False
            group.waiting.add(req.rid)
            return True
        prefix = f"merge group {spec.group!r}"
        if self.breaker:
            self.reject(req, f"{prefix}: merging cannot keep members in lockstep with {self.breaker}; "
                             "start the server without it to use sgl_merge")
            return False
        if spec.size > self.max_running:
            self.reject(req, f"{prefix}: size {spec.size} exceeds the server's limit of {self.max_running} "
                             "running requests (--max-running-requests); use a smaller size")
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
            group = self.groups[spec.group] = Group(spec.group, spec.size, spec.mode, signature=signature,
                                                    requested_max_new=req._sgl_merge_requested_max_new)
        mismatch = None
        if spec.size != group.size:
            mismatch = f"members disagree on sampling_params.custom_params.sgl_merge.size ({group.size} vs {spec.size})"
        elif spec.mode != group.mode:
            mismatch = f"members disagree on sampling_params.custom_params.sgl_merge.mode ({group.mode!r} vs {spec.mode!r})"
        elif req._sgl_merge_requested_max_new != group.requested_max_new:
            mismatch = "members disagree on sampling_params.max_new_tokens"
        elif (name := first_mismatch(group.signature, signature)) is not None:
            mismatch = f"members disagree on sampling_params.{name}"
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

    def expire(self) -> None:
        now = time.monotonic()
        for group in list(self.groups.values()):
            if not group.complete() and now - group.first_arrival > self.timeout_s:
                self.finish(group, f"merge group {group.key!r} timed out: only {len(group.members)} of {group.size} "
                                   f"members arrived within {self.timeout_s:g} s ({TIMEOUT_ENV})",
                            HTTPStatus.REQUEST_TIMEOUT)
            elif all(m.finished() for m in group.members) and group.complete():
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
        for m in group.members:
            if m is not req:
                m.init_next_round_input(self.scheduler.tree_cache)
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

    def on_abort(self, rid: str, abort_all: bool) -> None:
        """An abort matched some requests (SGLang matches rid prefixes): finish their whole groups."""
        for group in list(self.groups.values()):
            hit = [m.rid for m in group.members if abort_all or m.rid.startswith(rid)]
            if hit:
                self.finish(group, f"merge group {group.key!r} aborted: member {hit[0]!r} was aborted",
                            HTTPStatus.BAD_REQUEST)

"""Merge groups in the sampling step: merge the rows, sample once, commit the leader's token.

Row -> group maps live on SGLang's `SamplingBatchInfo`, which the scheduler already rebuilds,
filters and merges exactly when the batch composition changes; the hooks on those three events
(and on `copy_for_forward`, which copies the info for the forward pass) keep a `MergeMap` beside it.
Per step, `Sampler.forward` then does only device work: merge the members' rows in place (after
penalties, grammar masks and logit bias, which SGLang applied before), let SGLang sample, and
gather every member's token from its group leader, before the ids feed the next forward.
A batch without merge groups carries no map and takes SGLang's path untouched.

Each member's agreement (the share of its merged steps where its own argmax was the merged token)
is counted on the device, in a table indexed by a slot the member gets when it first enters a batch;
each step queues a non-blocking copy of the members' counters, which the host reads only when a
member finishes (`report_finished`). The per-step host work is a few attribute writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus

import torch

from sgl_merge.contract.join import KEEP_KEY
from sgl_merge.kernels.merge_logits import GatherPlan, gather_plan, merge_backend, merge_logits_, modes_of, pack_groups, to_device
from sgl_merge.runtime.groups import member_spec

logger = logging.getLogger("sgl_merge")

ATTR = "_sgl_merge_map"
# True while SGLang's retract_decode runs: it filters the batch one request at a time, before the
# groups hook takes the rest of each touched group out, so partial groups are expected there.
retracting = False
AGREE_ATTR = "_sgl_merge_agree"
INFO_KEY = "sgl_merge"


# Agreement counters: [slot, (agreed steps, merged steps)] int32 on the scheduler's device, one slot
# per member for its whole life (retractions included). Slots are handed out round-robin, so a
# slot comes back only after SLOTS later members: long after any step still in flight for it.
# Rows of a batch that are in no group count into one spare slot past the end, never read: every
# row is counted in one pass, without first selecting the members' rows.
SLOTS = 1 << 16
SPARE_SLOT = SLOTS
_stats: torch.Tensor | None = None
_next_slot = 0
# The step result the scheduler is processing: (MergeMap, counters on the host, copy event).
_current = None


@dataclass
class MergeMap:
    """The merge groups of one batch, row-aligned with `reqs`; tensors live on the batch device."""

    reqs: list
    group_rows: torch.Tensor  # [G, K_max] int32, -1 padded
    group_weights: torch.Tensor  # [G, K_max] float32, rows sum to 1
    group_modes: torch.Tensor  # [G] int32
    group_taus: torch.Tensor  # [G] float32
    modes: frozenset  # the modes of the groups (host side: picks the kernel work)
    plan: GatherPlan | None  # the torch merge path's gather plan (None where the kernels run)
    leader: torch.Tensor  # [N] int64: each row's group leader (itself when ungrouped)
    row_slots: torch.Tensor  # [N] int64: each row's agreement counter slot (SPARE_SLOT when ungrouped)
    member_slots: torch.Tensor  # [M] int64: the members' slots, in `members` order
    counted: torch.Tensor  # [N, 2] int32: a step's (agreed, 1) per row, column 0 rewritten each step
    members: list  # [M] the requests of those rows, in the same order
    index: dict  # id(request) -> its position in `members`


def _counters(device) -> torch.Tensor:
    global _stats
    if _stats is None:
        _stats = torch.zeros((SLOTS + 1, 2), dtype=torch.int32, device=device)
    return _stats


def _slots(members: list, device) -> torch.Tensor:
    """Each member's counter slot; a member new to the device gets the next slot, zeroed (on the
    schedule stream, which the forward stream waits for before it runs this batch)."""
    global _next_slot
    stats, fresh = _counters(device), []
    for req in members:
        if getattr(req, "_sgl_merge_slot", None) is None:
            req._sgl_merge_slot = _next_slot
            fresh.append(_next_slot)
            _next_slot = (_next_slot + 1) % SLOTS
    if fresh:
        stats.index_fill_(0, to_device(torch.tensor(fresh, dtype=torch.int64), device), 0)
    return to_device(torch.tensor([r._sgl_merge_slot for r in members], dtype=torch.int64), device)


def build_map(reqs: list, device) -> MergeMap | None:
    """The MergeMap for a batch of `reqs`, or None when it holds no complete merge group.

    A group only partly present in the batch has lost lockstep (it cannot happen while the
    scheduler hooks keep groups whole): its members are finished with an internal error.
    """
    rows_by_group: dict[str, list[int]] = {}
    for i, req in enumerate(reqs):
        spec = member_spec(req)
        if spec is not None and not req.finished():
            rows_by_group.setdefault(spec.group, []).append(i)
    groups = []
    for key, rows in rows_by_group.items():
        size = member_spec(reqs[rows[0]]).size
        if len(rows) == size:
            groups.append(rows)
            continue
        if retracting:
            continue
        message = (f"merge group {key!r} lost lockstep: {len(rows)} of {size} members in the batch "
                   "(internal error; please report)")
        logger.error("sgl-merge: %s", message)
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        for i in rows:
            reqs[i].to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR)
    if not groups:
        return None
    # A power of two: the Triton kernel compiles once per table width, not once per group size.
    k_max = 1 << (max(len(rows) for rows in groups) - 1).bit_length()
    specs = [member_spec(reqs[rows[0]]) for rows in groups]
    group_rows, group_weights, group_modes, group_taus = pack_groups(
        ((rows, [member_spec(reqs[i]).weight for i in rows], spec.mode, spec.tau) for rows, spec in zip(groups, specs)),
        device=device, k_max=k_max,
    )
    leader = list(range(len(reqs)))
    for rows in groups:
        for i in rows:
            leader[i] = rows[0]
    member_rows = [i for rows in groups for i in rows]
    members = [reqs[i] for i in member_rows]
    member_slots = _slots(members, device)
    row_slots = torch.full((len(reqs),), SPARE_SLOT, dtype=torch.int64, device=device)
    # (index_copy_ / index_fill_ rather than indexed assignment: plain device work, never a host sync)
    row_slots.index_copy_(0, to_device(torch.tensor(member_rows, dtype=torch.int64), device), member_slots)
    return MergeMap(
        reqs=list(reqs),
        group_rows=group_rows,
        group_weights=group_weights,
        group_modes=group_modes,
        group_taus=group_taus,
        modes=modes_of(spec.mode for spec in specs),
        plan=gather_plan(group_rows, group_weights) if merge_backend(device) == "torch" else None,
        leader=to_device(torch.tensor(leader, dtype=torch.int64), device),
        row_slots=row_slots,
        member_slots=member_slots,
        counted=torch.ones((len(reqs), 2), dtype=torch.int32, device=device),
        members=members,
        index={id(r): j for j, r in enumerate(members)},
    )


def _set(info, reqs: list) -> None:
    setattr(info, ATTR, build_map(reqs, info.device) if any(member_spec(r) for r in reqs) else None)


# ------------------------------------------------------------------ batch-change hooks


def on_new_info(original, info, batch, vocab_size):
    """AROUND SamplingBatchInfo.adjusted_from_schedule_batch: a new batch (prefill)."""
    out = original(info, batch, vocab_size)
    _set(info, batch.reqs)
    return out


def on_filter(original, info, keep_indices, keep_indices_device):
    """AROUND SamplingBatchInfo.adjusted_filter_batch: finished requests left the batch."""
    out = original(info, keep_indices, keep_indices_device)
    m = getattr(info, ATTR, None)
    if m is not None:
        _set(info, [m.reqs[i] for i in keep_indices])
    return out


def on_merge(original, info, other):
    """AROUND SamplingBatchInfo.adjusted_merge_batch: a prefill batch joined the running batch."""
    out = original(info, other)
    mine, theirs = getattr(info, ATTR, None), getattr(other, ATTR, None)
    if mine is not None or theirs is not None:
        # Rows without a map are plain requests; only their count matters for alignment.
        left = mine.reqs if mine is not None else [None] * (len(info) - len(other))
        right = theirs.reqs if theirs is not None else [None] * len(other)
        _set(info, left + right)
    return out


def on_copy_for_forward(result, info):
    """AFTER SamplingBatchInfo.copy_for_forward: the forward copy keeps the map."""
    setattr(result, ATTR, getattr(info, ATTR, None))
    return result


# ------------------------------------------------------------------ the sampling step


def sample(original, sampler, logits_output, sampling_info, *args, **kwargs):
    """AROUND Sampler.forward: merge, sample, commit the leader's token, count agreement. No host
    sync: the counters' copy to the host is queued, and read when a member finishes."""
    m = getattr(sampling_info, ATTR, None)
    if m is None:
        return original(sampler, logits_output, sampling_info, *args, **kwargs)
    logits = logits_output.next_token_logits
    # Each row's own choice before merging (read in place: no copy of the rows), for agreement.
    own = logits.argmax(dim=-1)
    merge_logits_(logits, m.group_rows, m.group_weights, m.group_modes, m.group_taus, modes=m.modes, plan=m.plan)
    ids = original(sampler, logits_output, sampling_info, *args, **kwargs)
    ids = ids.index_select(0, m.leader)
    m.counted[:, 0].copy_(own == ids)  # (agreed, 1) per row; rows in no group go to the spare slot
    stats = _stats
    stats.index_add_(0, m.row_slots, m.counted)
    counts, copied = stats.index_select(0, m.member_slots), None
    if counts.is_cuda:  # read on the host once this event has passed (SGLang waits for its own copy there)
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        counts = host.copy_(counts, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    setattr(logits_output, AGREE_ATTR, (m, counts, copied))
    return ids


def sample_from_probs(original, sampler, probs, sampling_info, *args, **kwargs):
    """AROUND Sampler._sample_from_probs: members take the leader's draw before logprobs are read,
    so the reported logprobs are those of the committed token."""
    ids, capture = original(sampler, probs, sampling_info, *args, **kwargs)
    m = getattr(sampling_info, ATTR, None)
    return (ids if m is None else ids[m.leader]), capture


def record_agreement(processor, batch, result, *args, **kwargs):
    """BEFORE the scheduler processes a batch result: note the step's counters, which the members
    that finish while it is processed report (`report_finished`). Nothing per member, no wait."""
    global _current
    recorded = getattr(getattr(result, "logits_output", None), AGREE_ATTR, None)
    if recorded is not None:
        _current = recorded
    return None


def report_finished(req) -> None:
    """A member finished (its KV is being released): put its merge figures in its output, read from
    the counters of the step being processed, or (ended between steps, e.g. aborted) from the device
    table itself."""
    spec = member_spec(req)
    slot = getattr(req, "_sgl_merge_slot", None)
    if spec is None or slot is None:
        return
    counts = None
    if _current is not None and (j := _current[0].index.get(id(req))) is not None:
        _, host, copied = _current
        if copied is not None:
            copied.synchronize()  # passed already: SGLang waited for the step's token ids
        counts = host[j]
    elif _stats is not None:
        counts = _stats[slot]
    agreed, steps = counts.tolist() if counts is not None else (0, 0)
    if not steps:
        return
    info = {"group": spec.group, "size": spec.size, "mode": spec.mode, "weight": spec.weight,
            "merged_steps": steps, "agreement": agreed / steps}
    if spec.mode == "entropy":
        info["tau"] = spec.tau
    report(req, INFO_KEY, info)


def report(req, key: str, info: dict) -> None:
    """Put `info` in a finishing request's output as `meta_info[key]`. Token-aligned like SGLang's
    other customized info, it rides on the last token, so streamed and whole responses both end
    with it."""
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info[key] = [None] * max(len(req.output_ids) - 1, 0) + [info]


def meta_info(original, manager, meta_info, state, customized_info, index, finish_reason):
    """AROUND TokenizerManager.update_request_meta_info: members get `meta_info["sgl_merge"]` as
    one object, the newest, and kept requests `meta_info["sgl_merge_keep"]`; requests without
    either get no key at all (their output stays unchanged)."""
    for key in (INFO_KEY, KEEP_KEY):  # a kept request's owner (`JoinRegistry.keep`) comes the same way
        ours = customized_info.get(key) if customized_info else None
        if ours is not None:
            customized_info = {k: v for k, v in customized_info.items() if k != key}
            newest = next((info for info in reversed(ours[index] or []) if info), None)
            if newest is not None:
                meta_info[key] = newest
    return original(manager, meta_info, state, customized_info, index, finish_reason)

"""Merge groups in the sampling step: merge the rows, sample once, commit the leader's token.

Row -> group maps live on SGLang's `SamplingBatchInfo`, which the scheduler already rebuilds,
filters and merges exactly when the batch composition changes; the hooks on those three events
(and on `copy_for_forward`, which copies the info for the forward pass) keep a `MergeMap` beside it.
Per step, `Sampler.forward` then does only device work: merge the members' rows in place (after
penalties, grammar masks and logit bias, which SGLang applied before), let SGLang sample, and
gather every member's token from its group leader, before the ids feed the next forward.
A batch without merge groups carries no map and takes SGLang's path untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus

import torch

from sgl_merge.kernels.merge_logits import merge_logits_, pack_groups
from sgl_merge.runtime.groups import member_spec

logger = logging.getLogger("sgl_merge")

ATTR = "_sgl_merge_map"
# True while SGLang's retract_decode runs: it filters the batch one request at a time, before the
# groups hook takes the rest of each touched group out, so partial groups are expected there.
retracting = False
AGREE_ATTR = "_sgl_merge_agree"
INFO_KEY = "sgl_merge"


@dataclass
class MergeMap:
    """The merge groups of one batch, row-aligned with `reqs`; tensors live on the batch device."""

    reqs: list
    group_rows: torch.Tensor  # [G, K_max] int32, -1 padded
    group_weights: torch.Tensor  # [G, K_max] float32, rows sum to 1
    group_modes: torch.Tensor  # [G] int32
    group_taus: torch.Tensor  # [G] float32
    leader: torch.Tensor  # [N] int64: each row's group leader (itself when ungrouped)
    member_rows: torch.Tensor  # [M] int64: the rows that belong to a merge group
    members: list  # [M] the requests of those rows, in the same order


def build_map(reqs: list, device) -> MergeMap | None:
    """The MergeMap for a batch of `reqs`, or None when it holds no complete merge group.

    A group only partly present in the batch has lost lockstep (it cannot happen while the
    scheduler hooks keep groups whole): its members are finished with an internal error.
    """
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

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
        for i in rows:
            reqs[i].to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR)
    if not groups:
        return None
    # A power of two: the Triton kernel compiles once per table width, not once per group size.
    k_max = 1 << (max(len(rows) for rows in groups) - 1).bit_length()
    group_rows, group_weights, group_modes, group_taus = pack_groups(
        ((rows, [member_spec(reqs[i]).weight for i in rows], member_spec(reqs[rows[0]]).mode,
          member_spec(reqs[rows[0]]).tau) for rows in groups),
        device=device, k_max=k_max,
    )
    leader = list(range(len(reqs)))
    for rows in groups:
        for i in rows:
            leader[i] = rows[0]
    member_rows = [i for rows in groups for i in rows]
    return MergeMap(
        reqs=list(reqs),
        group_rows=group_rows,
        group_weights=group_weights,
        group_modes=group_modes,
        group_taus=group_taus,
        leader=torch.tensor(leader, dtype=torch.int64).to(device, non_blocking=True),
        member_rows=torch.tensor(member_rows, dtype=torch.int64).to(device, non_blocking=True),
        members=[reqs[i] for i in member_rows],
    )


def _set(info, reqs: list) -> None:
    setattr(info, ATTR, build_map(reqs, info.device) if any(member_spec(r) for r in reqs) else None)


def _reqs(info) -> list:
    m = getattr(info, ATTR, None)
    return m.reqs if m is not None else []


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
    """AROUND Sampler.forward: merge, sample, commit the leader's token. No host sync."""
    m = getattr(sampling_info, ATTR, None)
    if m is None:
        return original(sampler, logits_output, sampling_info, *args, **kwargs)
    logits = logits_output.next_token_logits
    # Each member's own choice before merging, for the agreement figure.
    own = logits.index_select(0, m.member_rows).argmax(dim=-1)
    merge_logits_(logits, m.group_rows, m.group_weights, m.group_modes, m.group_taus)
    ids = original(sampler, logits_output, sampling_info, *args, **kwargs)
    ids = ids[m.leader]
    agree = own == ids.index_select(0, m.member_rows)
    copied = None
    if agree.is_cuda:  # copied without waiting; read on the host once this event has passed
        agree = agree.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    setattr(logits_output, AGREE_ATTR, (m.members, agree, copied))
    return ids


def sample_from_probs(original, sampler, probs, sampling_info, *args, **kwargs):
    """AROUND Sampler._sample_from_probs: members take the leader's draw before logprobs are read,
    so the reported logprobs are those of the committed token."""
    ids, capture = original(sampler, probs, sampling_info, *args, **kwargs)
    m = getattr(sampling_info, ATTR, None)
    return (ids if m is None else ids[m.leader]), capture


def record_agreement(processor, batch, result, *args, **kwargs):
    """BEFORE the scheduler processes a batch result (host side, where SGLang waits for the step's
    ids too): count each member's merged steps and the steps its own argmax matched the merged
    token."""
    recorded = getattr(getattr(result, "logits_output", None), AGREE_ATTR, None)
    if recorded is None:
        return None
    members, agree, copied = recorded
    if copied is not None:
        # Our own event: SGLang's `copy_done` exists only with the overlap scheduler.
        copied.synchronize()
    for req, ok in zip(members, agree.tolist()):
        spec = member_spec(req)
        steps = getattr(req, "_sgl_merge_steps", 0) + 1
        agreed = getattr(req, "_sgl_merge_agreed", 0) + int(ok)
        req._sgl_merge_steps, req._sgl_merge_agreed = steps, agreed
        info = {"group": spec.group, "size": spec.size, "mode": spec.mode, "weight": spec.weight,
                "merged_steps": steps, "agreement": agreed / steps}
        if spec.mode == "entropy":
            info["tau"] = spec.tau
        # Token-aligned, so SGLang's output streamer sends it with every streamed chunk as well as
        # at the end; only the newest entry is kept (the earlier ones are cleared).
        if req.customized_info is None:
            req.customized_info = {}
        values = req.customized_info.setdefault(INFO_KEY, [])
        if values:
            values[-1] = None
        values.append(info)
    return None


def meta_info(original, manager, meta_info, state, customized_info, index, finish_reason):
    """AROUND TokenizerManager.update_request_meta_info: members get `meta_info["sgl_merge"]` as
    one object, the newest; requests outside merge groups get no key at all (their output stays
    unchanged)."""
    ours = customized_info.get(INFO_KEY) if customized_info else None
    if ours is not None:
        customized_info = {k: v for k, v in customized_info.items() if k != INFO_KEY}
        newest = next((info for info in reversed(ours[index] or []) if info), None)
        if newest is not None:
            meta_info[INFO_KEY] = newest
    return original(manager, meta_info, state, customized_info, index, finish_reason)

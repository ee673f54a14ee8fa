"""Merge the logits rows of each merge group, in place: the Triton kernels, their launcher, the
plain torch reference beside them, a vectorised torch path for the CPU runtime, and the dispatch.

A merge group is a set of rows of the `[N, V]` logits tensor (any rows, any order). Each group has
per-member weights w_k (normalised to sum 1) and a mode; with member rows z_k upcast to fp32 the
merged row is

- mode 0, "logits":   m = sum_k w_k * z_k
- mode 1, "logprobs": m = sum_k w_k * log_softmax(z_k)       (geometric mixture)
- mode 2, "probs":    m = log(sum_k w_k * softmax(z_k))       (arithmetic mixture)
- mode 3, "entropy":  m = sum_k v_k * z_k,  v_k = w_k exp(-H_k / tau) / sum_j w_j exp(-H_j / tau)

where H_k = -sum_v p_kv log p_kv (nats) is the entropy of member k's own next-token distribution
p_k = softmax(z_k) at this step and tau > 0 the group's temperature: token by token, the weights
move toward the members that are sure of the next token (tau -> inf gives mode 0).

The merged row is written, cast back to the logits dtype, into EVERY member row; rows in no group
are never touched. A token masked to -inf in any member stays -inf in modes 0, 1 and 3 (a member
whose weight v_k underflows to 0 masks nothing); in mode 2 it is -inf only when it is -inf in
every member.

Layout (built on the host once per batch change, e.g. with `pack_groups`):

- `group_rows`    int32   [G, K_MAX]  member row indices, members first, then -1 padding;
                                      every group has at least one member, no row is in two groups.
- `group_weights` float32 [G, K_MAX]  weights normalised to sum 1 per group (0 for padding).
- `group_modes`   int32   [G]         0 / 1 / 2 / 3, see `MODES`.
- `group_taus`    float32 [G]         tau of mode 3 groups (1.0 in the others, unused there).

K_MAX is the width of the table (`group_rows.shape[1]`), a compile-time constant of the kernels.
The merge itself runs every decode step, so neither `merge_logits_triton` nor `merge_logits_torch`
synchronises with the host: no `.item()`, no boolean-mask indexing, no Python loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MODES = {"logits": 0, "logprobs": 1, "probs": 2, "entropy": 3}
MODE_LOGITS, MODE_LOGPROBS, MODE_PROBS, MODE_ENTROPY = MODES.values()
# The kernels may read module globals only when they are tl.constexpr objects.
_LOGITS = tl.constexpr(MODE_LOGITS)
_PROBS = tl.constexpr(MODE_PROBS)
_ENTROPY = tl.constexpr(MODE_ENTROPY)

# Tile width of both kernels. Each program streams BLOCK_V contiguous values of each member row.
BLOCK_V = 2048
# Width of the V-chunk one log-sum-exp program reduces. Splitting each row into chunks keeps the
# reduction grid (G x K_MAX x chunks) wide enough to fill the GPU even for a handful of rows; the
# merge kernel combines the few partials of a member (ceil(V / LSE_CHUNK_V) of them, 19 for V=151936).
LSE_CHUNK_V = 8 * BLOCK_V
# 8 warps = 8 values per thread per tile: 64 registers on sm_90 (4 warps would need 112), so more
# warps are resident to hide memory latency. Untuned; scripts/bench_merge_kernel.py measures it.
NUM_WARPS = 8


def pack_groups(
    groups: Iterable[tuple],
    device: torch.device | str | None = None,
    k_max: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (group_rows, group_weights, group_modes, group_taus) from `(rows, weights, mode)`
    or `(rows, weights, mode, tau)` tuples (tau defaults to 1.0; only mode 3 reads it).

    Host-side, once per batch change. Weights must be positive; they are normalised in fp32 here.
    `mode` is a `MODES` key or value. `k_max` widens the table beyond the largest group (a fixed
    width avoids recompiling the kernels when the largest group size changes).
    """
    groups = [tuple(g) + (1.0,) * (4 - len(g)) for g in groups]
    width = max((len(rows) for rows, *_ in groups), default=1)
    k_max = width if k_max is None else k_max
    if k_max < width:
        raise ValueError(f"k_max={k_max} is smaller than the largest group ({width} members)")
    group_rows = torch.full((len(groups), k_max), -1, dtype=torch.int32)
    group_weights = torch.zeros((len(groups), k_max), dtype=torch.float32)
    group_modes = torch.empty(len(groups), dtype=torch.int32)
    group_taus = torch.ones(len(groups), dtype=torch.float32)
    seen: set[int] = set()
    for g, (rows, weights, mode, tau) in enumerate(groups):
        mode = MODES[mode] if isinstance(mode, str) else mode
        if not rows or len(rows) != len(weights):
            raise ValueError(f"group {g}: needs at least one row and one weight per row")
        if mode not in MODES.values():
            raise ValueError(f"group {g}: unknown mode {mode!r}; expected one of {MODES}")
        if seen.intersection(rows) or len(set(rows)) != len(rows):
            raise ValueError(f"group {g}: a row may belong to one group only, once")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"group {g}: tau must be a positive number, got {tau!r}")
        seen.update(rows)
        w = torch.tensor(weights, dtype=torch.float32)
        if not bool((w > 0).all()):
            raise ValueError(f"group {g}: weights must be positive, got {list(weights)}")
        group_rows[g, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        group_weights[g, : len(rows)] = w / w.sum()
        group_modes[g] = mode
        group_taus[g] = tau
    return tuple(to_device(t, device) for t in (group_rows, group_weights, group_modes, group_taus))


def to_device(host: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`host` (a fresh CPU tensor) on `device` without blocking the host: through pinned memory and
    a non-blocking copy on CUDA, as SGLang moves its own per-batch tables. The caching host
    allocator keeps the pinned block alive until the copy has run."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def modes_of(groups_modes: Iterable) -> frozenset[int]:
    """The merge modes (MODES values) in use, from per-group mode names or values (host side)."""
    return frozenset(MODES[m] if isinstance(m, str) else int(m) for m in groups_modes)


def _check_layout(logits, group_rows, group_weights, group_modes, group_taus) -> None:
    """Shape, dtype and device checks only: tensor metadata, no host sync."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D tensor with contiguous rows")
    if group_rows.dtype != torch.int32 or group_modes.dtype != torch.int32 or group_weights.dtype != torch.float32 \
            or group_taus.dtype != torch.float32:
        raise TypeError("group_rows and group_modes must be int32, group_weights and group_taus float32")
    if group_weights.shape != group_rows.shape or group_modes.shape != group_rows.shape[:1] \
            or group_taus.shape != group_modes.shape:
        raise ValueError("group_weights must be [G, K_MAX] like group_rows, group_modes and group_taus [G]")
    for t in (group_rows, group_weights, group_modes, group_taus):
        if t.device != logits.device or not t.is_contiguous():
            raise ValueError("group tables must be contiguous and on the device of logits")


def merge_logits_reference(
    logits: torch.Tensor, group_rows: torch.Tensor, group_weights: torch.Tensor, group_modes: torch.Tensor,
    group_taus: torch.Tensor,
) -> None:
    """The specification, in plain torch: one group at a time, straight from the formulas.

    Mode 2 is written as logsumexp_k(log w_k + log_softmax(z_k)), which is log(sum_k w_k *
    softmax(z_k)) without the underflow of tiny probabilities to 0 (and so to -inf). Mode 3's
    entropy is `torch.special.entr` (-p log p, 0 at p = 0) summed over the vocabulary.
    """
    tables = (group_rows.tolist(), group_weights.tolist(), group_modes.tolist(), group_taus.tolist())
    for rows, weights, mode, tau in zip(*tables):
        members = [r for r in rows if r >= 0]
        w = torch.tensor([wk for r, wk in zip(rows, weights) if r >= 0], device=logits.device)[:, None]
        z = logits[members].float()
        if mode == MODE_LOGITS:
            merged = (w * z).sum(0)
        elif mode == MODE_LOGPROBS:
            merged = (w * z.log_softmax(-1)).sum(0)
        elif mode == MODE_PROBS:
            merged = torch.logsumexp(w.log() + z.log_softmax(-1), dim=0)
        elif mode == MODE_ENTROPY:
            entropy = torch.special.entr(z.softmax(-1)).sum(-1, keepdim=True)
            v = (w.log() - entropy / tau).softmax(0)
            merged = torch.where(v > 0, v * z, 0.0).sum(0)
        else:
            raise ValueError(f"unknown merge mode {mode}")
        logits[members] = merged.to(logits.dtype)


@dataclass(frozen=True)
class GatherPlan:
    """What the torch path reads off the group tables, derived once per batch change (`gather_plan`)
    rather than at every step: the row each [G, K_MAX] slot reads (a padding slot: its group's first
    member), which slots are members, whether every slot is a member with a positive weight
    (`dense`, host side: then the weighted sum needs no masking pass), and where the slots are one run
    of consecutive rows, group after group (`span`, the usual layout of a batch of merge groups: the
    merge then reads and writes that block in place, with no gather or scatter)."""

    rows: torch.Tensor  # [G * K_MAX] int64
    live: torch.Tensor  # [G, K_MAX, 1] bool
    dense: bool
    span: tuple[int, int] | None  # (first row, end) where dense and rows == first .. end - 1


def gather_plan(group_rows: torch.Tensor, group_weights: torch.Tensor) -> GatherPlan:
    """The torch path's `GatherPlan` for these tables. `dense` is read on the host: call it when the
    batch changes (on CPU, or where the Triton kernels are unavailable), not every step."""
    members = group_rows >= 0
    rows = torch.where(members, group_rows, group_rows[:, :1]).flatten().long()
    dense = bool((members & (group_weights > 0)).all())
    first = int(rows[0])
    run = dense and bool((rows == torch.arange(first, first + rows.numel(), device=rows.device)).all())
    return GatherPlan(rows=rows, live=members[..., None], dense=dense,
                      span=(first, first + rows.numel()) if run else None)


def merge_logits_torch(
    logits: torch.Tensor, group_rows: torch.Tensor, group_weights: torch.Tensor, group_modes: torch.Tensor,
    group_taus: torch.Tensor, modes: frozenset[int] | None = None, plan: GatherPlan | None = None,
) -> None:
    """Vectorised torch merge (the CPU runtime's path): gathers every group's members into a
    `[G, K_MAX, V]` fp32 scratch, merges all groups at once and scatters the result back.

    Every mode's formula is evaluated for every group and the group's own is selected: choosing
    per group on the host would need a sync. Padding slots gather and rewrite the group's first
    member: they read a value they then ignore and write the very row that member receives anyway,
    so the duplicate index in `index_copy_` is harmless. Scratch is ~5 x G x K_MAX x V fp32.

    `modes` (host side, e.g. from `modes_of` when the batch changed): the modes the groups use, if
    known. A batch of mode "logits" groups only, the default, then takes the weighted sum alone
    (scratch 1 x G x K_MAX x V) instead of evaluating every mode's formula. `plan`: the tables'
    `gather_plan`, where the caller keeps it from the batch change (else derived here, with a host
    read of `dense`).
    """
    n_groups, k_max = group_rows.shape
    if n_groups == 0:
        return
    _check_layout(logits, group_rows, group_weights, group_modes, group_taus)
    plan = plan or gather_plan(group_rows, group_weights)
    block = None if plan.span is None else logits[plan.span[0]:plan.span[1]].unflatten(0, (n_groups, k_max))
    z = (logits.index_select(0, plan.rows).view(n_groups, k_max, -1) if block is None else block).float()
    w = group_weights.view(n_groups, k_max, 1)
    if modes is not None and modes <= {MODE_LOGITS}:
        merged = (w * z).sum(1) if plan.dense else _weighted_sum(z, w, plan.live)
    else:
        merged = _merge_any_mode(z, w, plan.live, group_modes.view(n_groups, 1, 1), group_taus.view(-1, 1, 1))
    if block is not None:
        block.copy_(merged.unsqueeze(1))  # into every member row of the block (merged is a new tensor)
        return
    logits.index_copy_(0, plan.rows, merged.to(logits.dtype).unsqueeze(1).expand(-1, k_max, -1).flatten(0, 1))


def _weighted_sum(y: torch.Tensor, w: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * y_k over the live members (an underflowed weight masks nothing: no 0 * -inf)."""
    return torch.where(live & (w > 0), w * y, 0.0).sum(1)


def _merge_any_mode(z, group_weights, live, modes, taus) -> torch.Tensor:
    """Every mode's formula for every group, each group's own selected (no host sync)."""
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    # Mode 3: per-member weights from each member's entropy, renormalised over the live members.
    entropy = torch.special.entr(log_p.exp()).sum(-1, keepdim=True)  # [G, K, 1]
    v = torch.where(live, group_weights.log() - entropy / taus, -math.inf).softmax(1)
    w = torch.where(modes == MODE_ENTROPY, v, group_weights)
    # z itself in modes 0 and 3, log_softmax(z) in modes 1 and 2.
    y = torch.where((modes == MODE_LOGITS) | (modes == MODE_ENTROPY), z, log_p)
    mixture = torch.logsumexp(torch.where(live, w.log() + y, -math.inf), dim=1)
    return torch.where(modes[:, 0] == MODE_PROBS, mixture, _weighted_sum(y, w, live))


@triton.jit
def _shift(running_max):
    """The shift of exp(x - shift) in an online log-sum-exp: the running max, but 0 where it is
    still -inf (only masked values seen), so that -inf - -inf never makes a nan and exp gives 0."""
    return tl.where(running_max > -float("inf"), running_max, 0.0)


@triton.jit
def _rescaled(lane_max, lane_sum, lane_mom, shift):
    """(sum, moment) of exp(x - old_max) and exp(x - old_max) * (x - old_max), moved to `shift`:
    exp(x - s) = r exp(x - m) and (x - s) = (x - m) + (m - s), r = exp(m - s). 0 where m = -inf."""
    r = tl.exp(lane_max - shift)
    d = tl.where(lane_max > -float("inf"), lane_max - shift, 0.0)
    return lane_sum * r, (lane_mom + d * lane_sum) * r


@triton.jit
def _lse_partials_kernel(
    logits_ptr, stride_row, rows_ptr, modes_ptr, part_max_ptr, part_sum_ptr, part_mom_ptr, V, num_chunks,
    K_MAX: tl.constexpr, CHUNK_V: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (g, k, c): over chunk c of member k of group g, the max m, sum(exp(x - m)) and, for
    mode 3, the moment sum(exp(x - m) * (x - m)), from which the merge kernel gets the entropy.

    Lanes keep a running max, rescaled sum and moment (online softmax), reduced once at the end.
    Padding slots and mode-0 groups, which need no log-sum-exp, return at once without reading.
    """
    g = tl.program_id(0)
    k = tl.program_id(1)
    c = tl.program_id(2)
    row = tl.load(rows_ptr + g * K_MAX + k)
    mode = tl.load(modes_ptr + g)
    if (row < 0) | (mode == _LOGITS):
        return
    base = logits_ptr + row.to(tl.int64) * stride_row
    lane_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_V], tl.float32)
    lane_mom = tl.zeros([BLOCK_V], tl.float32)
    for start in tl.range(c * CHUNK_V, c * CHUNK_V + CHUNK_V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        shift = _shift(new_max)
        e = tl.exp(x - shift)
        if mode == _ENTROPY:
            lane_sum, lane_mom = _rescaled(lane_max, lane_sum, lane_mom, shift)
            lane_mom += tl.where(x > -float("inf"), e * (x - shift), 0.0)
            lane_sum += e
        else:
            lane_sum = lane_sum * tl.exp(lane_max - shift) + e
        lane_max = new_max
    chunk_max = tl.max(lane_max, axis=0)
    lane_sum, lane_mom = _rescaled(lane_max, lane_sum, lane_mom, _shift(chunk_max))
    slot = (g * K_MAX + k) * num_chunks + c
    tl.store(part_max_ptr + slot, chunk_max)
    tl.store(part_sum_ptr + slot, tl.sum(lane_sum, axis=0))
    tl.store(part_mom_ptr + slot, tl.sum(lane_mom, axis=0))


@triton.jit
def _member_stats(part_max_ptr, part_sum_ptr, part_mom_ptr, slot, num_chunks, CHUNKS_P2: tl.constexpr):
    """(log-sum-exp, entropy) of a whole member row from its per-chunk partials: with S and M the
    sum and moment moved to the row max, H = log S - M / S. (The entropy is only meaningful for
    mode 3 rows, whose partials carry the moment.)"""
    idx = tl.arange(0, CHUNKS_P2)
    mask = idx < num_chunks
    chunk_max = tl.load(part_max_ptr + slot * num_chunks + idx, mask=mask, other=-float("inf"))
    chunk_sum = tl.load(part_sum_ptr + slot * num_chunks + idx, mask=mask, other=0.0)
    chunk_mom = tl.load(part_mom_ptr + slot * num_chunks + idx, mask=mask, other=0.0)
    row_max = tl.max(chunk_max, axis=0)
    row_sum, row_mom = _rescaled(chunk_max, chunk_sum, chunk_mom, row_max)
    total, moment = tl.sum(row_sum, axis=0), tl.sum(row_mom, axis=0)
    return row_max + tl.log(total), tl.log(total) - moment / total


@triton.jit
def _merge_kernel(
    logits_ptr, stride_row, rows_ptr, weights_ptr, modes_ptr, taus_ptr, part_max_ptr, part_sum_ptr, part_mom_ptr,
    V, num_chunks, K_MAX: tl.constexpr, K_MAX_P2: tl.constexpr, CHUNKS_P2: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (g, b): merge columns [b * BLOCK_V, (b + 1) * BLOCK_V) of group g's members.

    Reads every member's tile once, accumulates in fp32, then writes the merged tile to every
    member. Groups own disjoint rows and programs disjoint tiles, so reading and writing in place
    cannot race. The member loop runs over the group's real size (padding trails), not K_MAX.
    Mode is a per-group runtime value; the branches on it are uniform within a program. Mode 3
    first turns the members' entropies into this step's weights (scalars, from the partials).
    """
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    mode = tl.load(modes_ptr + g)
    slot = tl.arange(0, K_MAX_P2)
    member_rows = tl.load(rows_ptr + g * K_MAX + slot, mask=slot < K_MAX, other=-1)
    size = tl.sum((member_rows >= 0).to(tl.int32), axis=0)

    # Mode 3: log-weights log w_k - H_k / tau, normalised with an online log-sum-exp over members.
    tau = tl.load(taus_ptr + g)
    lw_max = tau * 0.0 - float("inf")  # fp32 scalars, like the values the loop assigns
    lw_sum = tau * 0.0
    if mode == _ENTROPY:
        for k in tl.range(0, size):
            _, entropy = _member_stats(part_max_ptr, part_sum_ptr, part_mom_ptr, g * K_MAX + k, num_chunks, CHUNKS_P2)
            lw = tl.log(tl.load(weights_ptr + g * K_MAX + k)) - entropy / tau
            hi = tl.maximum(lw_max, lw)
            lw_sum = lw_sum * tl.exp(lw_max - hi) + tl.exp(lw - hi)
            lw_max = hi

    linear = tl.zeros([BLOCK_V], tl.float32)  # modes 0, 1, 3: sum_k w_k * y_k
    mix_max = tl.full([BLOCK_V], -float("inf"), tl.float32)  # mode 2: online logsumexp_k(log w_k + y_k)
    mix_sum = tl.zeros([BLOCK_V], tl.float32)
    for k in tl.range(0, size):
        row = tl.load(rows_ptr + g * K_MAX + k)
        w = tl.load(weights_ptr + g * K_MAX + k)
        y = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=in_v, other=0.0).to(tl.float32)
        if (mode == _LOGITS) | (mode == _ENTROPY):
            if mode == _ENTROPY:
                _, entropy = _member_stats(part_max_ptr, part_sum_ptr, part_mom_ptr, g * K_MAX + k, num_chunks,
                                           CHUNKS_P2)
                w = tl.exp(tl.log(w) - entropy / tau - lw_max) / lw_sum
            if w > 0:  # an underflowed weight must not turn a masked token into nan
                linear += w * y
        else:
            lse, _ = _member_stats(part_max_ptr, part_sum_ptr, part_mom_ptr, g * K_MAX + k, num_chunks, CHUNKS_P2)
            y -= lse
            if mode == _PROBS:
                # One exp per element: rescale whichever of (running max, new term) is smaller.
                x = tl.log(w) + y
                hi = tl.maximum(mix_max, x)
                ratio = tl.exp(tl.minimum(mix_max, x) - _shift(hi))
                mix_sum = tl.where(x > mix_max, mix_sum * ratio + 1.0, mix_sum + ratio)
                mix_max = hi
            else:
                linear += w * y
    merged = linear
    if mode == _PROBS:
        merged = mix_max + tl.log(mix_sum)  # -inf + log(0) = -inf for tokens masked in every member
    merged = merged.to(logits_ptr.dtype.element_ty)  # rounds to nearest even on GPU, like torch
    for k in tl.range(0, size):
        row = tl.load(rows_ptr + g * K_MAX + k)
        tl.store(logits_ptr + row.to(tl.int64) * stride_row + cols, merged, mask=in_v)


def merge_logits_triton(
    logits: torch.Tensor, group_rows: torch.Tensor, group_weights: torch.Tensor, group_modes: torch.Tensor,
    group_taus: torch.Tensor, modes: frozenset[int] | None = None,
) -> None:
    """Triton merge: a log-sum-exp kernel, then the merge kernel.

    Why two launches: modes 1, 2 and 3 need each member's log-sum-exp (or entropy) over the whole
    row before any merged value can be written, and a merge program only sees one V-tile. Fusing
    would need a grid-wide barrier or every program re-reading whole rows; a separate reduction
    costs one more read of the grouped rows (mode 0 groups skip it) and keeps both kernels simple
    and bandwidth-bound. The partials scratch is 3 x G x K_MAX x ceil(V / LSE_CHUNK_V) fp32 values.
    With `modes` known to be mode "logits" only (host side), the log-sum-exp launch is skipped.
    """
    n_groups, k_max = group_rows.shape
    if n_groups == 0:
        return
    _check_layout(logits, group_rows, group_weights, group_modes, group_taus)
    V = logits.shape[1]
    num_chunks = triton.cdiv(V, LSE_CHUNK_V)
    part_max = torch.empty((n_groups, k_max, num_chunks), dtype=torch.float32, device=logits.device)
    part_sum = torch.empty_like(part_max)
    part_mom = torch.empty_like(part_max)
    common = dict(
        logits_ptr=logits, stride_row=logits.stride(0), rows_ptr=group_rows, modes_ptr=group_modes,
        part_max_ptr=part_max, part_sum_ptr=part_sum, part_mom_ptr=part_mom, V=V, num_chunks=num_chunks,
        K_MAX=k_max, BLOCK_V=BLOCK_V,
    )
    if modes is None or not modes <= {MODE_LOGITS}:
        _lse_partials_kernel[(n_groups, k_max, num_chunks)](CHUNK_V=LSE_CHUNK_V, num_warps=NUM_WARPS, **common)
    _merge_kernel[(n_groups, triton.cdiv(V, BLOCK_V))](
        weights_ptr=group_weights,
        taus_ptr=group_taus,
        K_MAX_P2=triton.next_power_of_2(k_max),
        CHUNKS_P2=triton.next_power_of_2(num_chunks),
        num_warps=NUM_WARPS,
        **common,
    )


# The K widths (powers of two) the runtime pads its tables to, compiled before traffic.
WARM_WIDTHS = (1, 2, 4, 8, 16)
# Why the Triton kernels are off in this process (None while they serve): set when compiling them
# failed, at warm-up or at a first launch, after which the torch path serves every merge.
triton_failure: str | None = None
warm_seconds: float | None = None  # how long the warm-up at server start took (None: not run here)


def disable_triton(reason: str) -> None:
    global triton_failure
    import logging

    triton_failure = reason
    logging.getLogger("sgl_merge").error("sgl-merge: the Triton merge kernels are off, the torch path serves "
                                         "merges from now on: %s", reason)


def backend_status(device: torch.device | str) -> dict:
    """What serves merges on `device` in this process, for the plugin's status."""
    return {"backend": merge_backend(device), "triton_failure": triton_failure, "warm_seconds": warm_seconds,
            "warm_widths": list(WARM_WIDTHS) if warm_seconds is not None else []}


def merge_backend(device: torch.device | str) -> str:
    """"triton" or "torch": the path `merge_logits_` takes for logits on `device`."""
    return "triton" if torch.device(device).type == "cuda" and triton_failure is None else "torch"


def warm_up(device: torch.device | str, vocab: int, dtypes=(torch.float32,), widths=WARM_WIDTHS) -> float:
    """Compile both kernels for every table width in `widths` and logits dtype in `dtypes` at this
    vocabulary size (Triton specialises on it), so that no merge compiles inside the serving loop.
    Returns (and keeps, for the status) the seconds it took; if compiling fails, the torch path serves (`triton_failure` says
    why) instead of an exception reaching the scheduler."""
    import time

    start = time.perf_counter()
    try:
        for dtype in dtypes:
            for k in widths:
                logits = torch.zeros((k, vocab), dtype=dtype, device=device)
                tables = pack_groups([(list(range(k)), [1.0] * k, MODE_LOGPROBS)], device=device, k_max=k)
                merge_logits_triton(logits, *tables)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any compiler or driver failure: serve with torch
        disable_triton(f"compiling for V={vocab}, dtypes {[str(d) for d in dtypes]} failed: "
                       f"{type(e).__name__}: {e}")
    global warm_seconds
    warm_seconds = time.perf_counter() - start
    return warm_seconds


def merge_logits_(
    logits: torch.Tensor, group_rows: torch.Tensor, group_weights: torch.Tensor, group_modes: torch.Tensor,
    group_taus: torch.Tensor, modes: frozenset[int] | None = None, plan: GatherPlan | None = None,
) -> None:
    """Merge in place: the Triton kernels on CUDA tensors (unless they failed to compile here), the
    vectorised torch path elsewhere. `modes`: the modes in use, where the caller knows them; `plan`:
    the torch path's `gather_plan`, where the caller keeps one."""
    tables = (group_rows, group_weights, group_modes, group_taus)
    if merge_backend(logits.device) == "triton":
        try:
            return merge_logits_triton(logits, *tables, modes=modes)
        except Exception as e:  # noqa: BLE001 - a width or dtype not warmed failed to compile
            disable_triton(f"{type(e).__name__}: {e}")
    merge_logits_torch(logits, *tables, modes=modes, plan=plan)

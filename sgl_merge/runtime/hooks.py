"""The hook functions the plugin registers on SGLang 0.5.23, and where each one goes.

Each entry of `HOOKS` names an SGLang function, how it is wrapped, and the sgl-merge function that
does the work (in `groups` for scheduling, `sampling` for the sampling step, `join` for the KV
join; the request fields are parsed and validated by `sgl_merge.contract`). Everything a request
without `sgl_merge` touches returns to SGLang's own code at once.
"""

from __future__ import annotations

import logging
import zlib
from array import array
from http import HTTPStatus

from sgl_merge.contract.join import KEEP_KEY, parse_join, parse_keep
from sgl_merge.contract.merge import KEY, PREFIX, MergeSpecError, expand_shared_weights, parse_member_spec
from sgl_merge.runtime import join, sampling
from sgl_merge.runtime.groups import PROTECTED, GroupRegistry, member_spec

logger = logging.getLogger("sgl_merge")

_admission: GroupRegistry | None = None  # the registry of the admission pass in progress
_registry: GroupRegistry | None = None  # this process's scheduler's (one scheduler per process)
_joins: join.JoinRegistry | None = None  # its kept sources and joins, from the first such request on


def registry(scheduler) -> GroupRegistry:
    global _registry
    if _registry is None:
        _registry = GroupRegistry(scheduler)
    return _registry


def joins(scheduler) -> join.JoinRegistry:
    global _joins
    if _joins is None:
        _joins = join.JoinRegistry(scheduler)
    return _joins


def _asks_to_merge(req) -> bool:
    params = req.sampling_params.custom_params
    return isinstance(params, dict) and KEY in params


# ------------------------------------------------------------------ tokenizer process


def verify_request(result, params, vocab_size):
    """AFTER SamplingParams.verify: a malformed sgl_merge entry is a 400 naming the field."""
    spec = parse_member_spec(params.custom_params)
    join.verify(params)
    if spec is not None and params.beam_width not in (None, 1):
        raise MergeSpecError("sampling_params.beam_width", "sampling_params.beam_width cannot be combined with "
                             f"{PREFIX}: beam search cannot keep members in lockstep")
    return result


def dp_rank_for_group(group: str, dp_size: int) -> int:
    """The data-parallel rank every member of `group` goes to (stable across processes)."""
    return zlib.crc32(group.encode()) % dp_size


def route_group(result, manager, obj, *args, **kwargs):
    """AFTER TokenizerManager._create_tokenized_object: with --dp-size > 1, pin all members of a
    group to one rank (unless the client pinned the request itself)."""
    dp_size = getattr(manager.server_args, "dp_size", 1) or 1
    if dp_size > 1 and getattr(result, "routed_dp_rank", 0) is None:
        spec = parse_member_spec(getattr(result.sampling_params, "custom_params", None))
        if spec is not None:
            result.routed_dp_rank = dp_rank_for_group(spec.group, dp_size)
    return result


# ------------------------------------------------------------------ scheduler: start-up


def warm_kernels(result, scheduler, *args, **kwargs):
    """AFTER Scheduler.__init__ (before the server reports ready): on a GPU, compile the merge
    kernels for every table width the runtime uses, at this model's vocabulary, so no merge
    compiles inside the serving loop; on failure the torch path serves (the status says why)."""
    from sgl_merge.kernels import merge_logits as kernels

    if str(scheduler.device).startswith("cuda"):
        import torch

        device = torch.device("cuda", torch.cuda.current_device())
        secs = kernels.warm_up(device, scheduler.model_config.vocab_size)  # SGLang's logits are fp32
        if kernels.triton_failure is None:
            logger.info("sgl-merge: merge kernels compiled for K widths %s in %.1f s", kernels.WARM_WIDTHS, secs)
    return result


# ------------------------------------------------------------------ scheduler: arrival


def record_requested_max_new(original, scheduler, req):
    """AROUND Scheduler.init_req_max_new_tokens: members must agree on what they asked for,
    before SGLang caps it by each member's own context length. The registry exists from a first
    member's arrival on, before its grammar (if any) compiles and it reaches the waiting queue.
    A join becomes prompt + parts + continuation here, so that SGLang's length caps and checks
    that follow see the whole sequence; a join it cannot make is a 400 naming the source. A keep
    reserves its share of the kept-KV budget once SGLang capped its max_new_tokens (a 429 when
    the budget is spent)."""
    if _asks_to_merge(req):
        registry(scheduler)
        req._sgl_merge_requested_max_new = req.sampling_params.max_new_tokens
    params = req.sampling_params.custom_params
    if not isinstance(params, dict) or req.to_finish is not None or req.finished_reason is not None:
        return original(scheduler, req)
    if (spec := parse_join(params)) is not None:
        plan = joins(scheduler).plan(req, spec)
        if isinstance(plan, str):
            join.refuse(req, plan)
        else:
            joins(scheduler).attach(req, plan)
    out = original(scheduler, req)
    if (keep := parse_keep(params)) is not None and req.to_finish is None and req.finished_reason is None:
        if (why := joins(scheduler).admit_keep(req, keep)) is not None:
            join.refuse(req, why, HTTPStatus.TOO_MANY_REQUESTS)
    return out


def claim_joined_prefix(original, req, tree_cache=None, cow_mamba=None):
    """AROUND Req.init_next_round_input: a join's prefix is its sources' pinned KV, never a match of
    its token sequence in the tree (which holds no such sequential computation)."""
    plan = getattr(req, "_sgl_join", None)
    if plan is None or tree_cache is None or req.kv.holds_kv:
        return original(req, tree_cache, cow_mamba)
    from sglang.srt.mem_cache.common import match_kv_cache

    original(req, None, cow_mamba)
    match_kv_cache(req, tree_cache, array("q"))  # the root: consistent match fields, nothing locked
    n = plan.joined_len
    req.prefix_len = req.num_matched_prefix_tokens = req.kv.cache_protected_len = n
    if req.return_logprob and 0 <= req.logprob_start_len < n:
        req.logprob_start_len = n  # the parts' tokens are read, not computed: no input logprobs there


def joined_prefix_indices(original, batch, req):
    """AROUND allocation._prefix_kv_indices: a join's first prefill writes its sources' KV slots
    (prompt, then each part) into its row; nothing is copied."""
    plan = getattr(req, "_sgl_join", None)
    if plan is None or req.kv.holds_kv:
        return original(batch, req)
    return plan.kv_indices(batch.tree_cache)


def shift_joined_positions(result, cls, batch, model_runner, **kwargs):
    """AFTER ForwardBatch.init_new: positions of an "after_longest" join continue after the longest
    part, while its KV slots follow the whole concatenation. The per-row shift is written once per
    prefill; a decode step gathers it on the device (no host sync, no loop over rows)."""
    reg = _joins
    if reg is None:
        return result
    if result.forward_mode.is_extend():
        for req in batch.reqs:
            plan = getattr(req, "_sgl_join", None)
            if plan is not None and plan.delta:
                reg.set_row_delta(req.kv.req_pool_idx, plan.delta, result.positions.device)
    if reg.delta_rows and result.positions is not None and result.positions.numel():
        import torch

        delta = reg.position_delta[result.req_pool_indices]
        if result.forward_mode.is_extend():
            delta = torch.repeat_interleave(delta, result.extend_seq_lens, output_size=result.positions.numel())
        result.positions = result.positions - delta
    return result


def parathinker_architecture(original, model_config):
    """AROUND model_loader.utils.get_model_architecture: a Qwen2 checkpoint with ParaThinker's
    segment embeddings loads as sgl-merge's ParaThinker class (`sgl_merge.models.parathinker`)."""
    model_cls, arch = original(model_config)
    if arch == "Qwen2ForCausalLM":
        from sgl_merge.models import parathinker

        if parathinker.is_parathinker(model_config):
            return parathinker.model_class(), arch
    return model_cls, arch


def init_segment_rows(result, cls, batch, model_runner, **kwargs):
    """AFTER ForwardBatch.init_new: on a ParaThinker model, a prefill sets each row's segment from
    its cached prefix (the device tracks it from there)."""
    segments = getattr(model_runner.model, "sgl_segments", None)
    if segments is not None and result.forward_mode.is_extend() and batch.reqs:
        if model_runner.req_to_token_pool.req_to_token.shape[0] > segments.rows.shape[0]:
            raise RuntimeError("sgl-merge: the request pool is larger than the ParaThinker segment state covers; "
                               "lower --max-running-requests")
        segments.init_rows(batch.reqs, result)
    return result


def release_kv(original, req, tree_cache, *, checkpoint):
    """AROUND mem_cache.common.release_kv_cache: a finished member reports its merge figures; a
    finished kept request stays locked in the tree (locked right after SGLang's own checkpoint,
    before anything can evict it); a join's row loses its position shift; a finished request lets
    go of what it held (`JoinRegistry.ended`)."""
    plan = getattr(req, "_sgl_join", None)
    if plan is not None and _joins is not None and req.kv.holds_kv:
        _joins.clear_row_delta(req.kv.req_pool_idx)
    if req.finished():
        sampling.report_finished(req)
    out = original(req, tree_cache, checkpoint=checkpoint)
    if _joins is not None and req.finished():
        if checkpoint and (kept := _joins.keep(req)) is not None:
            sampling.report(req, KEEP_KEY, kept)  # the owner, for the keep's response
        _joins.ended(req)
    return out


def request_ended(result, scheduler, *args, **kwargs):
    """AFTER Scheduler._release_aborted_request and Scheduler.send_abort_output, the two calls of
    every path by which SGLang ends a request outside its output stream (aborted while queued or
    while its grammar compiles, retracted and aborted, refused on arrival): the request lets go of
    the kept KV it held or reserved (`JoinRegistry.ended`)."""
    if _joins is not None:
        req = args[-1] if args else kwargs.get("req")
        _joins.ended(req)
    return result


def forget_pins_on_flush(original, scheduler, *args, **kwargs):
    """AROUND Scheduler.flush_cache: a flush resets the tree (only when idle); kept sources go with it."""
    success = original(scheduler, *args, **kwargs)
    if success and _joins is not None:
        _joins.forget_all()
    return success


def add_to_queue(original, scheduler, req, is_retracted=False):
    """AROUND Scheduler._add_request_to_queue: register merge-group members; a member SGLang drops
    here (its queue limit or priority checks, or an existing member evicted for this request)
    ends its group at once."""
    reg = _registry
    if not _asks_to_merge(req):
        if reg is None or not reg.groups:
            return original(scheduler, req, is_retracted)
        with reg.dropped_members():
            return original(scheduler, req, is_retracted)
    reg = registry(scheduler)
    if not is_retracted:
        try:
            req._sgl_merge = parse_member_spec(req.sampling_params.custom_params)
        except MergeSpecError as e:
            reg.reject(req, str(e))
            return None
    if not reg.on_queue(req, is_retracted):
        return None
    with reg.dropped_members():
        out = original(scheduler, req, is_retracted)
    queue = scheduler.waiting_queue
    if _admission is reg and queue and queue[-1] is req:
        # Queued during an admission pass (SGLang queues requests whose grammar just compiled at
        # its start): keep it out of this pass like the other members of unready groups.
        reg.hidden.append(queue.pop())
    return out


def poll_group_timeouts(result, scheduler):
    """AFTER Scheduler._poll_timeout_aborts (run by one rank, whose aborts SGLang broadcasts to
    all): groups still incomplete after the timeout are aborted like SGLang's own timeouts, and
    kept sources past their TTL are released the same way."""
    if _registry is not None and _registry.groups:
        result = [*result, *_registry.timeout_aborts()]
    if _joins is not None and _joins.kept:
        result = [*result, *_joins.expiry_aborts()]
    return result


# ------------------------------------------------------------------ scheduler: admission


def new_prefill_batch(original, scheduler, prefill_delayer_single_pass, running_batch):
    """AROUND Scheduler._get_new_batch_prefill_raw: gang admission."""
    global _admission
    reg = _registry
    # Requests whose grammar compiled are queued at the start of the pass: a member among them may
    # open a group, so a pending grammar counts as a possible group.
    if reg is None or not (reg.groups or scheduler.grammar_manager.has_waiting_grammars()):
        return original(scheduler, prefill_delayer_single_pass, running_batch)
    reg.forget_finished()
    queue = scheduler.waiting_queue
    reg.hidden = [r for r in queue if reg.is_held_back(r)]
    if reg.hidden:
        held = set(map(id, reg.hidden))
        scheduler.waiting_queue = [r for r in queue if id(r) not in held]
    reg.allocatable = scheduler.get_num_allocatable_reqs(len(running_batch.reqs), running_batch=running_batch)
    _admission = reg
    try:
        new_batch, running = original(scheduler, prefill_delayer_single_pass, running_batch)
    finally:
        _admission = None
        scheduler.waiting_queue.extend(reg.hidden)
        reg.hidden = []
    reg.after_admission(new_batch, scheduler.chunked_req)
    return new_batch, running


def keep_groups_adjacent(result, policy, waiting_queue, *args, **kwargs):
    """AFTER SchedulePolicy.calc_priority: members of a group follow each other in the queue."""
    if _admission is not None and any(member_spec(r) for r in waiting_queue):
        waiting_queue[:] = _admission.make_adjacent(waiting_queue)
    return result


def admit(original, adder, req, *args, **kwargs):
    """AROUND PrefillAdder.add_one_req: the first member of a group goes in only if all fit."""
    if _admission is not None and member_spec(req) is not None:
        group = _admission.groups.get(member_spec(req).group)
        first = group is not None and not any(member_spec(r) and member_spec(r).group == group.key
                                              for r in adder.can_run_list)
        if first and (verdict := _admission.group_fits(adder, req)) is not None:
            return verdict
    return original(adder, req, *args, **kwargs)


# ------------------------------------------------------------------ scheduler: retraction, aborts


def retract(original, batch, *args, **kwargs):
    """AROUND ScheduleBatch.retract_decode: retract whole groups."""
    sampling.retracting = True
    try:
        retracted, ratio, aborted = original(batch, *args, **kwargs)
    finally:
        sampling.retracting = False
    if _registry is not None and any(member_spec(r) for r in retracted + aborted):
        _registry.retract_rest(batch, retracted, aborted)
    return retracted, ratio, aborted


def abort(original, scheduler, recv_req):
    """AROUND Scheduler.abort_request: an abort of one member ends its whole group. SGLang matches
    rids by prefix; members are matched exactly, so they are out of its reach during the call.
    An abort aimed at a kept source (its expiry, or /sgl_merge/release) releases it on this rank and
    reaches no request."""
    if isinstance(recv_req.rid, str) and recv_req.rid.startswith(join.RELEASE_RID):
        if _joins is not None and (key := join.parse_release_rid(recv_req.rid)) is not None:
            _joins.release(key)
        return None
    reg = _registry
    if reg is None:
        return original(scheduler, recv_req)
    protected = reg.protected_from(recv_req)
    for r in protected:
        r.rid = PROTECTED + r.rid
    try:
        result = original(scheduler, recv_req)
    finally:
        for r in protected:
            r.rid = r.rid[len(PROTECTED):]
    reg.on_abort(recv_req)
    return result


# (target, kind, function); kind is a HookType name.
HOOKS = [
    ("sglang.srt.managers.io_struct.GenerateReqInput._normalize_sampling_params", "BEFORE", expand_shared_weights),
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", "AFTER", verify_request),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object", "AFTER", route_group),
    ("sglang.srt.managers.scheduler.Scheduler.__init__", "AFTER", warm_kernels),
    ("sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens", "AROUND", record_requested_max_new),
    ("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "AROUND", add_to_queue),
    ("sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw", "AROUND", new_prefill_batch),
    ("sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority", "AFTER", keep_groups_adjacent),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", "AROUND", admit),
    ("sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode", "AROUND", retract),
    ("sglang.srt.managers.scheduler.Scheduler.abort_request", "AROUND", abort),
    ("sglang.srt.managers.scheduler.Scheduler._poll_timeout_aborts", "AFTER", poll_group_timeouts),
    ("sglang.srt.managers.scheduler.Scheduler.flush_cache", "AROUND", forget_pins_on_flush),
    ("sglang.srt.managers.schedule_batch.Req.init_next_round_input", "AROUND", claim_joined_prefix),
    ("sglang.srt.mem_cache.allocation._prefix_kv_indices", "AROUND", joined_prefix_indices),
    ("sglang.srt.mem_cache.common.release_kv_cache", "AROUND", release_kv),
    ("sglang.srt.managers.scheduler.Scheduler._release_aborted_request", "AFTER", request_ended),
    ("sglang.srt.managers.scheduler.Scheduler.send_abort_output", "AFTER", request_ended),
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER", shift_joined_positions),
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER", init_segment_rows),
    ("sglang.srt.model_loader.utils.get_model_architecture", "AROUND", parathinker_architecture),
    ("sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.adjusted_from_schedule_batch", "AROUND", sampling.on_new_info),
    ("sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.adjusted_filter_batch", "AROUND", sampling.on_filter),
    ("sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.adjusted_merge_batch", "AROUND", sampling.on_merge),
    ("sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.copy_for_forward", "AFTER", sampling.on_copy_for_forward),
    ("sglang.srt.layers.sampler.Sampler.forward", "AROUND", sampling.sample),
    ("sglang.srt.layers.sampler.Sampler._sample_from_probs", "AROUND", sampling.sample_from_probs),
    ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor.process_batch_result_prefill", "BEFORE", sampling.record_agreement),
    ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor.process_batch_result_decode", "BEFORE", sampling.record_agreement),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info", "AROUND", sampling.meta_info),
]

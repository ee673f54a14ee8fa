"""Request fields that crash SGLang 0.5.23's scheduler, refused early with a 400 instead.

A value SGLang's tokenizer process lets through but its scheduler cannot handle kills the
scheduler, and with it every client's connection. Each check here runs in the tokenizer process,
beside SGLang's own validation of the same request (`TokenizerManager._validate_one_request`, whose
ValueErrors are 400s naming the field), and touches only the values that would crash. The list of
what was found and how is in docs/reliability.md ("Inputs that crashed SGLang").
"""

from __future__ import annotations

import re

INT32_MAX = 2**31 - 1
# Parallel samples per request: SGLang expands `n` into that many requests (and as many uuids) in
# the HTTP process before anything else runs, so n = 2**31 wedges the server for every client.
MAX_PARALLEL_SAMPLES = 1024
# Fields SGLang indexes per request in a batch without checking their length (IndexError, a 500).
PER_REQUEST_LISTS = ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num")


def check_request(result, manager, obj, input_ids):
    """AFTER TokenizerManager._validate_one_request: one generate request, batches already split."""
    if not hasattr(obj, "top_logprobs_num"):  # an embedding request
        return result
    vocab_size = manager.model_config.vocab_size
    if input_ids is not None and getattr(obj, "input_embeds", None) is None:
        if len(input_ids) == 0:
            # The forward pass cannot reshape an empty prompt (text "" tokenizes to nothing).
            raise ValueError("the prompt is empty: text / input_ids must give at least one token")
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab_size:
            # The embedding lookup fails: "index out of range in self", scheduler dies.
            raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary), got {low if low < 0 else high}")
    top = obj.top_logprobs_num
    if obj.return_logprob and isinstance(top, int) and top > vocab_size:
        # get_top_logprobs_raw: "selected index k out of range", scheduler dies.
        raise ValueError(f"top_logprobs_num must be at most the vocabulary size ({vocab_size}), got {top}")
    start = obj.logprob_start_len
    if obj.return_logprob and isinstance(start, int) and start < -1:
        # add_input_logprob_return_values asserts on the count of input logprobs: scheduler dies.
        raise ValueError(f"logprob_start_len must be -1 (no input logprobs) or a position >= 0, got {start}")
    if getattr(obj, "positional_embed_overrides", None) is not None:
        # An in-process (Engine) field; sent as JSON it reaches the scheduler as a plain list,
        # which it cannot reconstruct (AttributeError, scheduler dies).
        raise ValueError("positional_embed_overrides can only be passed in-process (sglang.Engine), not over HTTP")
    params = obj.sampling_params if isinstance(obj.sampling_params, dict) else {}
    _check_sampling_params(params, vocab_size)
    return result


def _check_sampling_params(params: dict, vocab_size: int) -> None:
    top_k = params.get("top_k")
    if isinstance(top_k, int) and top_k > INT32_MAX:
        # The sampling tensors are int32 ("value cannot be converted to type int32 without overflow").
        raise ValueError(f"sampling_params.top_k must be at most {INT32_MAX} (-1 disables it), got {top_k}")
    stop_ids = params.get("stop_token_ids")
    min_new = params.get("min_new_tokens")
    if isinstance(stop_ids, list) and isinstance(min_new, int) and min_new > 0:
        # The min_new_tokens penalty scatters into a [batch, vocab + 1] tensor: scheduler dies.
        bad = [t for t in stop_ids if isinstance(t, int) and not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sampling_params.stop_token_ids must lie in [0, {vocab_size}) (the vocabulary), "
                             f"got {bad[0]}")
    patterns = params.get("stop_regex")
    for pattern in [patterns] if isinstance(patterns, str) else patterns if isinstance(patterns, list) else []:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:  # re.error is not a ValueError: SGLang answers a 500
            raise ValueError(f"sampling_params.stop_regex {pattern!r} is not a valid regular expression: {e}") from None


def check_parallel_samples(obj) -> None:
    """BEFORE GenerateReqInput._handle_parallel_sampling: `n` is an int in [1, MAX_PARALLEL_SAMPLES]."""
    params = obj.sampling_params
    for p in [params] if isinstance(params, dict) else params if isinstance(params, list) else []:
        if not isinstance(p, dict) or "n" not in p:
            continue
        n = p["n"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PARALLEL_SAMPLES:
            raise ValueError(f"sampling_params.n must be an integer from 1 to {MAX_PARALLEL_SAMPLES}, got {n!r}")


def check_batch_lists(obj) -> None:
    """BEFORE GenerateReqInput._normalize_batch_inputs: per-request lists have one entry per prompt."""
    for name in PER_REQUEST_LISTS:
        value = getattr(obj, name, None)
        if isinstance(value, list) and len(value) != obj.batch_size:
            raise ValueError(f"{name} is a list of {len(value)}, but the batch has {obj.batch_size} prompts: "
                             "give one entry per prompt, or a single value for all")


def check_single_rid(obj) -> None:
    """BEFORE GenerateReqInput._normalize_single_inputs: one prompt has one rid, a string."""
    if obj.rid is not None and not isinstance(obj.rid, str):
        raise ValueError(f"rid must be a string for a single prompt (a list only for a batch), got {obj.rid!r}")


_IO = "sglang.srt.managers.io_struct.GenerateReqInput"
HOOKS = [
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "AFTER", check_request),
    (f"{_IO}._handle_parallel_sampling", "BEFORE", check_parallel_samples),
    (f"{_IO}._normalize_batch_inputs", "BEFORE", check_batch_lists),
    (f"{_IO}._normalize_single_inputs", "BEFORE", check_single_rid),
]

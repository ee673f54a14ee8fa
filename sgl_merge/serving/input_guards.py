"""Request fields that crash SGLang 0.5.23's scheduler, refused early with a 400 instead.

A value SGLang's tokenizer process lets through but its scheduler cannot handle kills the
scheduler, and with it every client's connection. Each check here runs in the tokenizer process,
beside SGLang's own validation of the same request (`TokenizerManager._validate_one_request`, whose
ValueErrors are 400s naming the field), and touches only the values that would crash. The list of
what was found and how is in README ("Inputs that crashed SGLang").
"""

from __future__ import annotations


INT32_MAX = 2**31 - 1


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
    top_k = obj.sampling_params.get("top_k") if isinstance(obj.sampling_params, dict) else None
    if isinstance(top_k, int) and top_k > INT32_MAX:
        # The sampling tensors are int32 ("value cannot be converted to type int32 without overflow").
        raise ValueError(f"sampling_params.top_k must be at most {INT32_MAX} (-1 disables it), got {top_k}")
    return result


HOOKS = [
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "AFTER", check_request),
]

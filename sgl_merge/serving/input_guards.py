"""Request fields that crash SGLang 0.5.23's scheduler, refused early with a 400 instead.

A value SGLang's tokenizer process lets through but its scheduler cannot handle kills the
scheduler, and with it every client's connection. Each check here runs in the tokenizer process,
beside SGLang's own validation of the same request (`TokenizerManager._validate_one_request`, whose
ValueErrors are 400s naming the field), and touches only the values that would crash. The list of
what was found and how is in README ("Inputs that crashed SGLang").
"""

from __future__ import annotations


def check_request(result, manager, obj, input_ids):
    """AFTER TokenizerManager._validate_one_request: one generate request, batches already split."""
    if not hasattr(obj, "top_logprobs_num"):  # an embedding request
        return result
    vocab_size = manager.model_config.vocab_size
    top = obj.top_logprobs_num
    if obj.return_logprob and isinstance(top, int) and top > vocab_size:
        # get_top_logprobs_raw: "selected index k out of range", scheduler dies.
        raise ValueError(f"top_logprobs_num must be at most the vocabulary size ({vocab_size}), got {top}")
    return result


HOOKS = [
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "AFTER", check_request),
]

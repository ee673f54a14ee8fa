"""The `sgl_merge` member entry: `sampling_params.custom_params["sgl_merge"]`.

    {"group": "<unique id>", "size": K, "mode": "logits" | "logprobs" | "probs" | "entropy",
     "weight": 1.0, "tau": 1.0}

`tau` is the temperature of mode "entropy" (per-step weights w_k exp(-H_k / tau), see
`sgl_merge.kernels.merge_logits`); members of a group must agree on mode and tau.

A group sent as one batch with one shared `sampling_params` (the only batch shape SGLang's
gateway, smg, forwards) gives its members' weights as a list instead: `"weights": [w0, ...]`,
one per prompt; `expand_shared_weights` turns it into each member's `weight`.

Parsed and validated here, once, in the tokenizer process (so bad input is a 400 that names the
field) and again in the scheduler (which attaches the parsed spec to the request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgl_merge.contract.errors import ContractError

KEY = "sgl_merge"
MODES = ("logits", "logprobs", "probs", "entropy")
FIELDS = ("group", "size", "mode", "weight", "tau")
PREFIX = f"sampling_params.custom_params.{KEY}"

# Sampling parameters every member of a group must share: one token is sampled for all of them.
# (max_new_tokens too, but it is compared as requested, before SGLang caps it per member.)
SHARED_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "min_new_tokens", "stop_strs", "stop_token_ids",
    "stop_regex_strs", "regex", "json_schema", "ebnf", "structural_tag", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "logit_bias", "sampling_seed",
)


class MergeSpecError(ContractError):
    """A request's sgl_merge entry (or sgl_merge_keep / sgl_merge_join field) is malformed: a 400
    whose message names the field `field`."""


@dataclass(frozen=True)
class MemberSpec:
    group: str
    size: int
    mode: str = "logits"
    weight: float = 1.0
    tau: float = 1.0


def parse_member_spec(custom_params) -> MemberSpec | None:
    """The request's MemberSpec, None if it does not ask for merging; MergeSpecError if malformed."""
    if not isinstance(custom_params, dict) or KEY not in custom_params:
        return None
    entry = custom_params[KEY]
    if not isinstance(entry, dict):
        raise MergeSpecError(
            PREFIX,
            f"{PREFIX} must be an object like "
            '{"group": "<id>", "size": K, "mode": "logits"}, '
            f"got {type(entry).__name__}"
        )
    if "weights" in entry:
        raise MergeSpecError(f"{PREFIX}.weights",
                             f"{PREFIX}.weights is for a batch of all K members with one shared sampling_params "
                             f"(one list entry per prompt); give each member its own {PREFIX}.weight otherwise")
    refuse_unknown(entry, FIELDS, PREFIX)
    group = entry.get("group")
    if not isinstance(group, str) or not group:
        raise MergeSpecError(f"{PREFIX}.group",
                             f"{PREFIX}.group must be a non-empty string unique to this merge, got {group!r}")
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MergeSpecError(f"{PREFIX}.size",
                             f"{PREFIX}.size must be an integer >= 1 (the number of members), got {size!r}")
    mode = entry.get("mode", "logits")
    if mode not in MODES:
        raise MergeSpecError(f"{PREFIX}.mode", f"{PREFIX}.mode must be one of {list(MODES)}, got {mode!r}")
    weight, tau = entry.get("weight", 1.0), entry.get("tau", 1.0)
    if not positive(weight):
        raise MergeSpecError(f"{PREFIX}.weight", f"{PREFIX}.weight must be a positive number, got {weight!r}")
    if not positive(tau):
        raise MergeSpecError(f"{PREFIX}.tau", f"{PREFIX}.tau must be a positive number (the temperature of mode "
                             f"'entropy'), got {tau!r}")
    if "tau" in entry and mode != "entropy":
        raise MergeSpecError(f"{PREFIX}.tau", f"{PREFIX}.tau is the temperature of mode 'entropy'; it has no effect "
                             f"with mode {mode!r}")
    return MemberSpec(group=group, size=size, mode=mode, weight=float(weight), tau=float(tau))


def refuse_unknown(entry: dict, allowed: tuple[str, ...], prefix: str) -> None:
    """MergeSpecError naming the first field of `entry` (the object at `prefix`) not in `allowed`."""
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise MergeSpecError(f"{prefix}.{unknown[0]}",
                             f"{prefix} has unknown field(s) {unknown}; allowed: {list(allowed)}")


def positive(value) -> bool:
    """A finite number > 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def sampling_signature(sampling_params) -> dict:
    """The shared sampling fields of a request, for comparing members."""
    return {f: getattr(sampling_params, f, None) for f in SHARED_SAMPLING_FIELDS}


def first_mismatch(a: dict, b: dict) -> str | None:
    """The name of the first shared sampling field that differs, or None."""
    return next((f for f in SHARED_SAMPLING_FIELDS if a.get(f) != b.get(f)), None)


def expand_shared_weights(obj, num: int) -> None:
    """BEFORE GenerateReqInput._normalize_sampling_params: a batch whose one shared sampling_params
    carries `sgl_merge.weights` becomes one sampling_params per prompt, each with its `weight`."""
    params = obj.sampling_params
    entry = params.get("custom_params", {}).get(KEY) if isinstance(params, dict) else None
    if not isinstance(entry, dict) or "weights" not in entry:
        return
    weights = entry["weights"]
    if getattr(obj, "parallel_sample_num", 1) != 1:
        raise MergeSpecError(f"{PREFIX}.weights", f"{PREFIX}.weights cannot be combined with sampling_params.n > 1")
    if not isinstance(weights, list) or len(weights) != num:
        raise MergeSpecError(f"{PREFIX}.weights", f"{PREFIX}.weights must be a list with one weight per prompt "
                             f"({num}), got {weights!r}")
    if "weight" in entry:
        raise MergeSpecError(f"{PREFIX}.weights", f"{PREFIX} takes weights (one per prompt) or weight, not both")
    rest = {k: v for k, v in entry.items() if k != "weights"}
    obj.sampling_params = [
        {**params, "custom_params": {**params["custom_params"], KEY: {**rest, "weight": w}}} for w in weights
    ]

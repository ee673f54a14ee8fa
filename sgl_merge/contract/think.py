"""The `think_merge` and `parathink` fields of the OpenAI routes (one per request, not both); what
the server runs for them is `sgl_merge.serving.think_merge` and `sgl_merge.serving.parathink`.

    {"think_merge": {"k": 4, "mode": "logits", "first": null, "thinking_budget": 4096,
                     "thinking_temperature": 0.6, "weighting": "uniform", "keep": null,
                     "confidence_window": null, "tau": null}}

    {"parathink": {"paths": 4, "first": null, "thinking_budget": 4096, "thinking_temperature": 0.6,
                   "positions": "after_longest", "summary_prefix": null, "layout": "auto"}}

A null value is its default. Malformed input is a ThinkMergeError naming the field (`think_merge.k`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgl_merge.contract.errors import ContractError
from sgl_merge.contract.join import POSITIONS
from sgl_merge.contract.merge import MODES, positive

THINK_MERGE = "think_merge"
PARATHINK = "parathink"
FIELDS = (THINK_MERGE, PARATHINK)
THINK_MERGE_DEFAULTS = {"k": None, "mode": "logits", "first": None, "thinking_budget": 4096,
                        "thinking_temperature": 0.6, "weighting": "uniform", "keep": None,
                        "confidence_window": None, "tau": None}
WEIGHTINGS = ("uniform", "confidence")
PARATHINK_DEFAULTS = {"paths": None, "first": None, "thinking_budget": 4096, "thinking_temperature": 0.6,
                      "positions": "after_longest", "summary_prefix": None, "layout": "auto"}
LAYOUTS = ("auto", "parathinker", "plain")


def needs_confidence(weighting: str, keep: int | None) -> bool:
    """Whether a think_merge call scores its traces' confidence: to weight them by it, or to keep
    only the most confident."""
    return weighting == "confidence" or keep is not None


class ThinkMergeError(ContractError):
    """Bad input for a think_merge or parathink call: a 400 whose message names the field (`field`,
    also `param`: the OpenAI error's)."""

    @property
    def param(self) -> str:
        return self.field


@dataclass(frozen=True)
class ThinkMergeConfig:
    k: int
    mode: str = "logits"
    first: int | None = None
    thinking_budget: int = 4096
    thinking_temperature: float = 0.6
    weighting: str = "uniform"
    keep: int | None = None
    confidence_window: int | None = None
    tau: float | None = None
    method = THINK_MERGE  # the request field this config came from

    @property
    def merged(self) -> int:
        """How many traces finish thinking for the answer: the first `first` of the k, else all k
        (of which `keep`, when given, answer)."""
        return self.first or self.k

    @property
    def needs_confidence(self) -> bool:
        return needs_confidence(self.weighting, self.keep)


@dataclass(frozen=True)
class ParaThinkConfig:
    k: int  # paths launched
    first: int | None = None
    thinking_budget: int = 4096
    thinking_temperature: float = 0.6
    positions: str = "after_longest"
    summary_prefix: str | None = None  # None: the layout's
    layout: str = "auto"
    needs_confidence = False
    method = PARATHINK

    @property
    def merged(self) -> int:
        """How many paths the summary reads: the first `first` to finish, else all."""
        return self.first or self.k


def _integer(entry: dict, name: str, low: int, high: int | None, field: str) -> int:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ThinkMergeError(f"{field}.{name}", f"{field}.{name} must be an integer {bound}, got {value!r}")
    return value


def _width(entry: dict, name: str, max_group: int | None, field: str, advice: str = "") -> int:
    """How many traces or paths: an integer >= 1 that fits the server's largest merge group."""
    value = _integer(entry, name, 1, None, field)
    if max_group is not None and value > max_group:
        raise ThinkMergeError(f"{field}.{name}", f"{field}.{name} is {value}, but this server runs at most "
                              f"{max_group} requests at once (--max-running-requests){advice}")
    return value


def _choice(entry: dict, name: str, choices: tuple[str, ...], field: str) -> None:
    if entry[name] not in choices:
        raise ThinkMergeError(f"{field}.{name}", f"{field}.{name} must be one of {list(choices)}, got {entry[name]!r}")


def _temperature(entry: dict, field: str) -> float:
    value = entry["thinking_temperature"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ThinkMergeError(f"{field}.thinking_temperature",
                              f"{field}.thinking_temperature must be a number >= 0, got {value!r}")
    return float(value)


def _entry(entry, field: str, defaults: dict, example: str, width: str, what: str) -> dict:
    """The entry over its defaults (a null is the default); its required `width` there."""
    if not isinstance(entry, dict):
        raise ThinkMergeError(field, f"{field} must be an object like {example}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(defaults))
    if unknown:
        raise ThinkMergeError(f"{field}.{unknown[0]}", f"{field} has unknown key(s) {unknown}; allowed: {list(defaults)}")
    entry = {**defaults, **{key: value for key, value in entry.items() if value is not None}}
    if entry[width] is None:
        raise ThinkMergeError(f"{field}.{width}", f"{field}.{width} is required: the number of thinking {what}")
    return entry


def parse_think_merge(entry, max_group: int | None) -> ThinkMergeConfig:
    """A think_merge call's config; ThinkMergeError naming the field for anything malformed.
    `max_group` is the largest merge group the server can run (its --max-running-requests)."""
    field = THINK_MERGE
    entry = _entry(entry, field, THINK_MERGE_DEFAULTS, '{"k": 4}', "k", "traces")
    k = _width(entry, "k", max_group, field, "; lower k or restart the server with a larger limit")
    first = None if entry["first"] is None else _integer(entry, "first", 1, k, field)
    _choice(entry, "mode", MODES, field)
    temperature = _temperature(entry, field)
    _choice(entry, "weighting", WEIGHTINGS, field)
    keep = None if entry["keep"] is None else _integer(entry, "keep", 1, first or k, field)
    window = None if entry["confidence_window"] is None else _integer(entry, "confidence_window", 1, None, field)
    if window is not None and entry["weighting"] != "confidence" and keep is None:
        raise ThinkMergeError(f"{field}.confidence_window", f"{field}.confidence_window only applies with "
                              'weighting "confidence" or keep')
    tau = entry["tau"]
    if tau is not None:
        if entry["mode"] != "entropy":
            raise ThinkMergeError(f"{field}.tau", f'{field}.tau is the temperature of mode "entropy"; '
                                  f"it has no effect with mode {entry['mode']!r}")
        if not positive(tau):
            raise ThinkMergeError(f"{field}.tau", f"{field}.tau must be a positive number, got {tau!r}")
        tau = float(tau)
    return ThinkMergeConfig(k=k, mode=entry["mode"], first=first,
                            thinking_budget=_integer(entry, "thinking_budget", 1, None, field),
                            thinking_temperature=temperature, weighting=entry["weighting"], keep=keep,
                            confidence_window=window, tau=tau)


def parse_parathink(entry, max_group: int | None) -> ParaThinkConfig:
    """A parathink call's config; ThinkMergeError naming the field for anything malformed."""
    field = PARATHINK
    entry = _entry(entry, field, PARATHINK_DEFAULTS, '{"paths": 4}', "paths", "paths")
    paths = _width(entry, "paths", max_group, field)
    first = None if entry["first"] is None else _integer(entry, "first", 1, paths, field)
    _choice(entry, "positions", POSITIONS, field)
    prefix = entry["summary_prefix"]
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ThinkMergeError(f"{field}.summary_prefix", f"{field}.summary_prefix must be a non-empty string (the "
                              f"summary's first tokens, prefilled by the join), got {prefix!r}")
    _choice(entry, "layout", LAYOUTS, field)
    return ParaThinkConfig(k=paths, first=first, thinking_budget=_integer(entry, "thinking_budget", 1, None, field),
                           thinking_temperature=_temperature(entry, field), positions=entry["positions"],
                           summary_prefix=prefix, layout=entry["layout"])


def parse(field: str, entry, max_group: int | None) -> ThinkMergeConfig | ParaThinkConfig:
    """The config of a call with `field` (one of FIELDS)."""
    return (parse_think_merge if field == THINK_MERGE else parse_parathink)(entry, max_group)

"""The KV join's two request fields (`sampling_params.custom_params`); what the server does with
them is `sgl_merge.runtime.join`.

    "sgl_merge_keep": true | {"ttl_s": 300, "owner": "<secret>"}
        When this request finishes, keep its KV (prompt + output, all but the last sampled
        token, which never went through the model) locked in the radix cache for a later join,
        until a join releases it or `ttl_s` seconds pass. The source belongs to `owner`: only a
        join or a release that presents it can use the source. Without one the server makes one
        up and answers it as `meta_info["sgl_merge_keep"]["owner"]` (one per /generate call).

    "sgl_merge_join": {"sources": ["rid-a", "rid-b", ...], "owner": "<secret>" | ["<secret>", ...],
                       "prompt_len": P, "positions": "after_longest" | "sequential",
                       "release_sources": true}
        This request's input is the continuation only. It runs after
        prompt(P tokens, shared by all sources) + part_1 + ... + part_n, where part_i is source
        i's kept tokens from P on, read from the sources' KV as it is: nothing is copied or
        recomputed, only the continuation is prefilled. Positions of the continuation start at
        P + the longest part ("after_longest", ParaThinker's convention) or at P + the sum of the
        parts ("sequential", what one sequence of that length would get). P defaults to the
        sources' longest common prefix (with one source: its whole length). `owner` is each
        source's owner (one string for all).

A keep is refused with a 429 while the server's kept-KV budget is spent; sgl-merge's own clients
wait that out (`busy_pauses`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sgl_merge.contract.merge import KEY as MERGE_KEY, MergeSpecError, refuse_unknown

KEEP_KEY = "sgl_merge_keep"
JOIN_KEY = "sgl_merge_join"
KEEP_PREFIX = f"sampling_params.custom_params.{KEEP_KEY}"
JOIN_PREFIX = f"sampling_params.custom_params.{JOIN_KEY}"
POSITIONS = ("after_longest", "sequential")
KEEP_FIELDS = ("ttl_s", "owner")
JOIN_FIELDS = ("sources", "owner", "prompt_len", "positions", "release_sources")
DEFAULT_TTL_S = 300.0
MAX_TTL_S = 24 * 3600.0
MAX_SOURCES = 256
MAX_OWNER_LEN = 256
BUSY_WAIT_S = 300.0  # how long sgl-merge's own clients wait out a spent kept-KV budget (429s)


@dataclass(frozen=True)
class KeepSpec:
    ttl_s: float = DEFAULT_TTL_S
    owner: str | None = None  # None until the tokenizer process makes one up


@dataclass(frozen=True)
class JoinSpec:
    sources: tuple[str, ...]
    owners: tuple[str | None, ...] = ()  # one per source
    prompt_len: int | None = None
    positions: str = "after_longest"
    release_sources: bool = True


def _owner(value, where: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_OWNER_LEN:
        return value
    raise MergeSpecError(where, f"{where} must be a non-empty string of at most {MAX_OWNER_LEN} characters (a secret "
                         f"only the keeping client knows), got {value!r}")


def parse_keep(custom_params) -> KeepSpec | None:
    """The request's KeepSpec, None if it does not ask to be kept; MergeSpecError if malformed."""
    if not isinstance(custom_params, dict) or KEEP_KEY not in custom_params:
        return None
    entry = custom_params[KEEP_KEY]
    if entry is True:
        return KeepSpec()
    if not isinstance(entry, dict) or not set(entry) <= set(KEEP_FIELDS):
        raise MergeSpecError(KEEP_PREFIX,
                             f'{KEEP_PREFIX} must be true or {{"ttl_s": seconds, "owner": "<secret>"}}, got {entry!r}')
    ttl = entry.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL_S:
        raise MergeSpecError(f"{KEEP_PREFIX}.ttl_s",
                             f"{KEEP_PREFIX}.ttl_s must be a number of seconds in (0, {MAX_TTL_S:g}], got {ttl!r}")
    owner = entry.get("owner")
    return KeepSpec(float(ttl), None if owner is None else _owner(owner, f"{KEEP_PREFIX}.owner"))


def parse_owners(value, n: int, where: str) -> tuple[str | None, ...]:
    """`owner` of a join or release: one string for all n sources, or a list of n (`where`: the
    field's path)."""
    if value is None:
        return (None,) * n
    if isinstance(value, list):
        if len(value) != n:
            raise MergeSpecError(where, f"{where} must be one owner for all sources or a list of {n} (one per "
                                 f"source), got a list of {len(value)}")
        return tuple(_owner(v, f"{where}[{i}]") for i, v in enumerate(value))
    return (_owner(value, where),) * n


def parse_join(custom_params) -> JoinSpec | None:
    """The request's JoinSpec, None if it does not ask for a join; MergeSpecError if malformed."""
    if not isinstance(custom_params, dict) or JOIN_KEY not in custom_params:
        return None
    entry = custom_params[JOIN_KEY]
    if not isinstance(entry, dict):
        raise MergeSpecError(JOIN_PREFIX, f'{JOIN_PREFIX} must be an object like {{"sources": ["<rid>", ...], '
                             f'"owner": "<secret>"}}, got {type(entry).__name__}')
    refuse_unknown(entry, JOIN_FIELDS, JOIN_PREFIX)
    sources = entry.get("sources")
    if (not isinstance(sources, list) or not 1 <= len(sources) <= MAX_SOURCES
            or not all(isinstance(s, str) and s for s in sources)):
        raise MergeSpecError(f"{JOIN_PREFIX}.sources", f"{JOIN_PREFIX}.sources must be a list of 1 to {MAX_SOURCES} "
                             f"request ids (rids of finished requests sent with {KEEP_KEY}), got {sources!r}")
    if len(set(sources)) != len(sources):
        raise MergeSpecError(f"{JOIN_PREFIX}.sources", f"{JOIN_PREFIX}.sources names a request twice: {sources!r}")
    owners = parse_owners(entry.get("owner"), len(sources), f"{JOIN_PREFIX}.owner")
    prompt_len = entry.get("prompt_len")
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0):
        raise MergeSpecError(f"{JOIN_PREFIX}.prompt_len", f"{JOIN_PREFIX}.prompt_len must be an integer >= 0 (tokens "
                             f"the sources share), got {prompt_len!r}")
    positions = entry.get("positions", "after_longest")
    if positions not in POSITIONS:
        raise MergeSpecError(f"{JOIN_PREFIX}.positions",
                             f"{JOIN_PREFIX}.positions must be one of {list(POSITIONS)}, got {positions!r}")
    release = entry.get("release_sources", True)
    if not isinstance(release, bool):
        raise MergeSpecError(f"{JOIN_PREFIX}.release_sources",
                             f"{JOIN_PREFIX}.release_sources must be true or false, got {release!r}")
    if MERGE_KEY in custom_params:
        raise MergeSpecError(JOIN_PREFIX, f"{JOIN_PREFIX} cannot be combined with custom_params.{MERGE_KEY} (yet): "
                             "send the join as a plain request")
    return JoinSpec(tuple(sources), owners, prompt_len, positions, release)


def busy_pauses(wait_s: float = BUSY_WAIT_S):
    """The pauses of a client that retries while the kept-KV budget is spent (429): from 0.2 s,
    doubling up to 5 s, for as long as `wait_s` from this call allows; then none (the 429 is the
    answer)."""
    deadline = time.monotonic() + wait_s

    def pauses(pause: float = 0.2):
        while time.monotonic() + pause <= deadline:
            yield pause
            pause = min(2 * pause, 5.0)

    return pauses()

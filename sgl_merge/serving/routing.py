"""Behind a gateway, a merge group whose members come in separate requests must carry a routing key.

SGLang's gateway (smg) sends each HTTP request to one worker; members sent in separate requests
meet only if they share one `X-SMG-Routing-Key` (consistent hashing puts one key on one worker).
A worker sees only its own members, so it cannot tell "the rest went elsewhere" from "the rest are
late", and a split group would wait for the group timeout. With `SGLANG_MERGE_REQUIRE_ROUTING_KEY=1`
(set on workers behind a gateway; docs/scaling-out.md) such a request without the header is a 400
at once, naming the header and the one-request alternative. Requests that carry all of their
groups' members, and requests outside merge groups, are never affected.
"""

from __future__ import annotations

from collections import Counter

from sgl_merge.contract.merge import KEY
from sgl_merge.envs import flag

ENV = "SGLANG_MERGE_REQUIRE_ROUTING_KEY"
HEADER = "x-smg-routing-key"


def _prompts(obj) -> int:
    for field in ("input_ids", "text", "input_embeds"):
        value = getattr(obj, field, None)
        if value is not None:
            nested = field != "text" and value and isinstance(value[0], list)
            return len(value) if (field == "text" and isinstance(value, list)) or nested else 1
    return 1


def incomplete_groups(obj) -> list[str]:
    """The merge groups this request carries only some members of (malformed entries are left to
    the spec's own validation)."""
    params = getattr(obj, "sampling_params", None)
    counts: Counter = Counter()
    sizes: dict[str, object] = {}
    for p, members in ([(p, 1) for p in params] if isinstance(params, list) else [(params, _prompts(obj))]):
        entry = (p or {}).get("custom_params", {}).get(KEY) if isinstance(p, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("group"), str):
            counts[entry["group"]] += members
            sizes[entry["group"]] = entry.get("size")
    return [g for g, n in counts.items() if isinstance(sizes[g], int) and n < sizes[g]]


def check_routing_key(obj, raw_request) -> None:
    """ValueError (a 400) for members sent apart without a routing key, where the server requires one."""
    if not flag(ENV) or raw_request is None:
        return
    if raw_request.headers.get(HEADER):
        return
    groups = incomplete_groups(obj)
    if groups:
        raise ValueError(f"merge group {groups[0]!r}: this request carries only some of its members and no "
                         "X-SMG-Routing-Key header; behind a gateway, members sent separately must share one "
                         "X-SMG-Routing-Key (or send the whole group in one request: input_ids for all members, "
                         f"one shared sampling_params with sgl_merge.weights) ({ENV}=1 on this server)")

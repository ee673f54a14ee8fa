"""The `sglang.srt.plugins` entry point: checks the SGLang release, registers the runtime hooks.

SGLang calls `load()` in every server process (tokenizer manager, schedulers, detokenizer) and only
logs a plugin's exceptions, so the plugin reports its own state: the scheduler adds an `sgl_merge`
entry to its internal state, which `/server_info` returns under `internal_states`. `sgl-merge
serve` reads it before it reports the server ready.
"""

from __future__ import annotations

import logging

from sgl_merge import __version__
from sgl_merge.compat import check_sglang_version

logger = logging.getLogger("sgl_merge")

INTERNAL_STATE_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)

_status: dict = {"active": False, "version": __version__}


def status() -> dict:
    """This process's view of the plugin: active, versions, and the hooks it registered."""
    return dict(_status)


def _report_status(result, controller, *args, **kwargs):
    """AFTER hook on the scheduler's internal-state readback: add the plugin's status, the
    largest merge group this scheduler can run (the HTTP routes check `think_merge.k` against it),
    the requests kept for a KV join and the radix-cache tokens locked now (what a leak would show)."""
    from sgl_merge.runtime import hooks

    scheduler = controller.scheduler
    result.internal_state["sgl_merge"] = {
        **status(), "max_group_size": scheduler.max_running_requests,
        "kept_sources": sorted(hooks._joins.kept) if hooks._joins is not None else [],
        "locked_cache_tokens": scheduler.tree_cache.protected_size(),
    }
    return result


def load() -> None:
    """Entry point. Refuses (raises, which SGLang logs) on any SGLang other than the pinned one."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    sglang_version = check_sglang_version()
    from sgl_merge.runtime.hooks import HOOKS
    from sgl_merge.serving.input_guards import HOOKS as GUARD_HOOKS
    from sgl_merge.serving.openai_api import HOOKS as SERVING_HOOKS

    hooks = [(INTERNAL_STATE_TARGET, "AFTER", _report_status), *HOOKS, *SERVING_HOOKS, *GUARD_HOOKS]
    for target, kind, fn in hooks:
        HookRegistry.register(target, fn, HookType[kind])
    _status.update(
        active=True, sglang_version=sglang_version, hooks=[target for target, _, _ in hooks]
    )
    logger.info("sgl-merge %s active on sglang %s", __version__, sglang_version)

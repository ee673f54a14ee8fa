"""The `sglang.srt.plugins` entry point: checks the SGLang release, registers the runtime hooks.

SGLang calls `load()` in every server process (tokenizer manager, schedulers, detokenizer) and only
logs a plugin's exceptions, so the plugin reports its own state: the scheduler adds an `sgl_merge`
entry to its internal state, which `/server_info` returns under `internal_states`. `sgl-merge
serve` reads it before it reports the server ready.
"""

from __future__ import annotations

import logging
import sys

from sgl_merge import __version__
from sgl_merge.compat import check_sglang_version

logger = logging.getLogger("sgl_merge")

INTERNAL_STATE_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)

TOKENIZER_MANAGER_INIT = "sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__"

_status: dict = {"active": False, "version": __version__}
_routes_added = False


def status() -> dict:
    """This process's view of the plugin: active, versions, and the hooks it registered."""
    return dict(_status)


def _report_status(result, controller, *args, **kwargs):
    """AFTER hook on the scheduler's internal-state readback: add the plugin's status, the
    largest merge group this scheduler can run (the HTTP routes check `think_merge.k` against it),
    what serves merges (the Triton kernels, or the torch path and why),
    the requests kept for a KV join with the kept-KV budget, and the radix-cache tokens locked now
    (what a leak would show)."""
    from sgl_merge.kernels.merge_logits import backend_status
    from sgl_merge.runtime import hooks

    scheduler = controller.scheduler
    result.internal_state["sgl_merge"] = {
        **status(), "max_group_size": scheduler.max_running_requests,
        "merge_kernels": backend_status(str(scheduler.device)),
        "kept_sources": sorted(rid for _, rid in hooks.joins(scheduler).kept),
        "kept_budget": hooks.joins(scheduler).budget(),
        "locked_cache_tokens": scheduler.tree_cache.protected_size(),
    }
    return result


def _add_routes(result, *args, **kwargs):
    """AFTER TokenizerManager.__init__, in the HTTP process: serve the KV join's routes on SGLang's app."""
    global _routes_added
    http_server = sys.modules.get("sglang.srt.entrypoints.http_server")
    if http_server is not None and not _routes_added:
        from sgl_merge.serving.join_routes import add_routes

        add_routes(http_server.app)
        _routes_added = True
    return result


def hook_table() -> list[tuple[str, str, object]]:
    """Every (SGLang target, HookType name, function) the plugin registers."""
    from sgl_merge.runtime.hooks import HOOKS
    from sgl_merge.serving.input_guards import HOOKS as GUARD_HOOKS
    from sgl_merge.serving.openai_api import HOOKS as SERVING_HOOKS

    return [(INTERNAL_STATE_TARGET, "AFTER", _report_status), (TOKENIZER_MANAGER_INIT, "AFTER", _add_routes),
            *HOOKS, *SERVING_HOOKS, *GUARD_HOOKS]


def load() -> None:
    """Entry point. Refuses (raises, which SGLang logs) on any SGLang other than the pinned one.
    In the HTTP process it also adds the KV join's routes (`sgl_merge.serving.join_routes`), once
    SGLang's tokenizer manager exists, before the server listens."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    sglang_version = check_sglang_version()
    hooks = hook_table()
    for target, kind, fn in hooks:
        HookRegistry.register(target, fn, HookType[kind])
    _status.update(
        active=True, sglang_version=sglang_version, hooks=[target for target, _, _ in hooks]
    )
    logger.info("sgl-merge %s active on sglang %s", __version__, sglang_version)

"""Every hook target resolves against the installed SGLang, with a call shape our hook function
can take, and the SGLang behaviour the runtime relies on without a hook is still there. Seconds, no
server: a drift in SGLang shows up here first, not as a scheduler that misbehaves."""

from __future__ import annotations

import importlib
import inspect

import pytest

from sgl_merge.runtime import plugin

HOOKS = plugin.hook_table()


def resolve(target: str):
    """The SGLang object a dotted hook target names: its longest importable module, then attributes
    (AttributeError where SGLang no longer has it)."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module of {target!r} can be imported")


def _positional(params) -> list:
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("target,kind,fn", HOOKS, ids=[f"{kind}:{t.rsplit('.', 2)[-2]}.{t.rsplit('.', 1)[-1]}"
                                                       for t, kind, _ in HOOKS])
def test_the_hook_target_exists_and_takes_what_the_hook_passes(target, kind, fn):
    obj = resolve(target)
    assert callable(obj), f"{target} is not callable in this SGLang"
    theirs = list(inspect.signature(obj).parameters.values())
    owner = resolve(target.rsplit(".", 1)[0])
    if inspect.isclass(owner) and isinstance(inspect.getattr_static(owner, target.rsplit(".", 1)[1]), classmethod):
        theirs = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD), *theirs]
    ours = list(inspect.signature(fn).parameters.values())
    if kind in ("AROUND", "AFTER"):
        ours = ours[1:]  # the original function, or its result
    if any(p.kind == p.VAR_POSITIONAL for p in ours):
        return
    their_pos, our_pos = _positional(theirs), _positional(ours)
    assert len(our_pos) <= len(their_pos), f"{fn.__name__} takes {len(our_pos)} positional arguments, {target} " \
                                           f"has {len(their_pos)}"
    required = [p for p in their_pos if p.default is p.empty]
    assert len(required) <= len(our_pos) or any(p.kind == p.VAR_KEYWORD for p in ours), \
        f"{target} requires {[p.name for p in required]}, {fn.__name__} takes {[p.name for p in our_pos]}"
    names = {p.name for p in theirs}
    for p in ours:
        if p.kind == p.KEYWORD_ONLY:
            assert p.name in names, f"{fn.__name__} expects keyword {p.name!r}, which {target} no longer has"


def test_the_model_runner_still_prepares_every_forward_and_every_prefill_capture():
    """ParaThinker's segment ids are written by `prepare_for_forward`: SGLang must call it before
    every forward (eager, decode graph replay, prefill graph replay) and at prefill graph capture,
    and flag the capture (where the dummy batch must leave the rows' states alone)."""
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.model_executor.runner.prefill_cuda_graph_runner import PrefillCudaGraphRunner
    from sglang.srt.runtime_context import get_flags

    forward = inspect.getsource(ModelRunner._forward_raw)
    assert forward.index("prepare_for_forward") < forward.index("decode_cuda_graph_runner.execute")
    assert "prepare_for_forward" in inspect.getsource(PrefillCudaGraphRunner.capture_one_shape)
    assert "capturing_prefill_graph = True" in inspect.getsource(PrefillCudaGraphRunner._capture)
    assert get_flags().dp.capturing_prefill_graph is False

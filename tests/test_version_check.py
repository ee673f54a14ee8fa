"""The runtime hooks refuse any SGLang other than the pinned release."""

import pytest

from sgl_merge import compat
from sgl_merge.runtime import plugin


def test_supported_version_passes():
    assert compat.check_sglang_version("0.5.23") == "0.5.23"
    assert compat.installed_sglang_version() == compat.SUPPORTED_SGLANG


@pytest.mark.parametrize("found", ["0.5.22", "0.5.24", "0.6.0", None])
def test_other_versions_are_refused_with_the_fix(found):
    with pytest.raises(compat.SGLangVersionError) as e:
        compat.check_sglang_version(found)
    msg = str(e.value)
    assert "sglang==0.5.23" in msg and "pip install 'sglang==0.5.23'" in msg
    assert (f"sglang {found} is installed" if found else "sglang is not installed") in msg


def test_plugin_registers_nothing_on_a_wrong_version(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    monkeypatch.setattr(compat, "installed_sglang_version", lambda: "0.5.22")
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: registered.append(a)))
    with pytest.raises(compat.SGLangVersionError):
        plugin.load()
    assert registered == [] and plugin.status()["active"] is False

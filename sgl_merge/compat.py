"""The SGLang release the runtime hooks are written against, and the check that enforces it.

The hooks patch SGLang internals (scheduler admission, the sampling step) whose shape changes
between releases; running them against another release could desynchronise merge groups silently,
so a mismatch is refused loudly instead.
"""

from importlib import metadata

SUPPORTED_SGLANG = "0.5.23"


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the release sgl-merge's runtime hooks target."""


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


_INSTALLED = object()


def check_sglang_version(found: str | None | object = _INSTALLED) -> str:
    """Return the SGLang version (`found`, by default the installed one), or raise
    SGLangVersionError naming the fix."""
    if found is _INSTALLED:
        found = installed_sglang_version()
    if found != SUPPORTED_SGLANG:
        have = f"sglang {found} is installed" if found else "sglang is not installed"
        raise SGLangVersionError(
            f"sgl-merge's runtime hooks target sglang=={SUPPORTED_SGLANG}, but {have}. "
            f"Install the supported release: pip install 'sglang=={SUPPORTED_SGLANG}'. "
            "The plugin stays inactive rather than patch internals it was not written for."
        )
    return found

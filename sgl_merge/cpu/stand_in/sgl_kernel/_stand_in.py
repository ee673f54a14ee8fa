"""The one way the stand-in says "not on CPU": a function that raises, naming itself."""


def unsupported(name: str, feature: str):
    def raise_unsupported(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: {feature} is not supported on CPU by sgl-merge's sgl_kernel "
            "stand-in (the real sgl_kernel cannot load on this machine). Run without that "
            "feature, or on a GPU machine."
        )

    raise_unsupported.__name__ = name
    raise_unsupported.__qualname__ = name
    return raise_unsupported

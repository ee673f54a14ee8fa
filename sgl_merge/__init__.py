"""sgl-merge: ThinkMerge for SGLang — think in parallel, answer as one.

K branches of one SGLang program think independently, then answer as one merge group: at every
answer token the K next-token logit rows are averaged on the device, one token is sampled from the
merged distribution and committed to every branch.

The frontend (which imports SGLang's `sglang.lang`) loads on first use of one of its names, so the
runtime plugin, the kernels and `scripts/gpu_check.py` import this package without it.
"""

__version__ = "0.1.0"

__all__ = ["APIKeyError", "MergeError", "RuntimeEndpoint", "__version__", "merge_gen", "merge_gen_stream", "parathink",
           "think_merge", "vote"]


def __getattr__(name: str):
    if name in __all__:
        from sgl_merge import frontend

        return getattr(frontend, name)
    raise AttributeError(f"module 'sgl_merge' has no attribute {name!r}")

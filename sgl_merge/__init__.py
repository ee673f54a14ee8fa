"""sgl-merge: ThinkMerge for SGLang — think in parallel, answer as one.

K branches of one SGLang program think independently, then answer as one merge group: at every
answer token the K next-token logit rows are averaged on the device, one token is sampled from the
merged distribution and committed to every branch.
"""

__version__ = "0.1.0"

from sgl_merge.frontend import (  # noqa: E402
    MergeError,
    RuntimeEndpoint,
    merge_gen,
    merge_gen_stream,
    parathink,
    think_merge,
    vote,
)

__all__ = ["MergeError", "RuntimeEndpoint", "__version__", "merge_gen", "merge_gen_stream", "parathink", "think_merge",
           "vote"]

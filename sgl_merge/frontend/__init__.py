"""sgl-merge in the SGLang frontend language: merged generation over forks."""

from sgl_merge.frontend.merge import (
    MergeError,
    ensure_merge_server,
    merge_gen,
    merge_gen_stream,
    think_merge,
    vote,
)

__all__ = ["MergeError", "ensure_merge_server", "merge_gen", "merge_gen_stream", "think_merge", "vote"]

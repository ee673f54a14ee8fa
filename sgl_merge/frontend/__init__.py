"""sgl-merge in the SGLang frontend language: merged generation over forks, and a RuntimeEndpoint
whose `forks.join("concate_and_append")` joins KV."""

from sgl_merge.frontend.endpoint import RuntimeEndpoint
from sgl_merge.frontend.merge import (
    MergeError,
    ensure_merge_server,
    merge_gen,
    merge_gen_stream,
    think_merge,
    vote,
)

__all__ = ["MergeError", "RuntimeEndpoint", "ensure_merge_server", "merge_gen", "merge_gen_stream", "think_merge", "vote"]

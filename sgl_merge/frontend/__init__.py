"""sgl-merge in the SGLang frontend language: merged generation over forks (`merge`), parallel
thinking with a summary over the paths' KV (`parathink`), and a RuntimeEndpoint whose
`forks.join("concate_and_append")` joins KV (`endpoint`). Laid out as SGLang's own frontend: the
calls check their arguments and call the backend (`backend`: all the HTTP), and the results are
written into the program state in one place (`state`)."""

from sgl_merge.frontend.endpoint import RuntimeEndpoint
from sgl_merge.frontend.merge import (
    APIKeyError,
    MergeError,
    ensure_merge_server,
    merge_gen,
    merge_gen_stream,
    think_merge,
    vote,
)
from sgl_merge.frontend.parathink import parathink

__all__ = ["APIKeyError", "MergeError", "RuntimeEndpoint", "ensure_merge_server", "merge_gen", "merge_gen_stream",
           "parathink", "think_merge", "vote"]

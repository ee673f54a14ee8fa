"""Device kernels of sgl-merge: the in-place merge of each merge group's logits rows."""

from sgl_merge.kernels.merge_logits import (
    MODES,
    merge_logits_,
    merge_logits_reference,
    merge_logits_torch,
    merge_logits_triton,
    pack_groups,
)

__all__ = [
    "MODES",
    "merge_logits_",
    "merge_logits_reference",
    "merge_logits_torch",
    "merge_logits_triton",
    "pack_groups",
]

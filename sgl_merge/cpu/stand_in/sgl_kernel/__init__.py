"""sgl-merge's CPU stand-in for `sgl_kernel`, SGLang's compiled kernel package.

The real `sgl_kernel` wheel is CUDA-only: on a machine without libcuda it cannot be imported, yet
SGLang 0.5.23's CPU engine imports a handful of `*_cpu` functions from it at module import time.
This package provides exactly those names, each implemented in plain torch or raising
`NotImplementedError` that names the function and says the feature is unsupported on CPU. It is put
on PYTHONPATH by `sgl-merge serve` only when the real package cannot load, and refuses to load on
a machine with a GPU. Any other name is missing on purpose: importing it fails loudly.
"""

import torch

if torch.cuda.is_available():
    raise ImportError(
        "sgl-merge's CPU stand-in for sgl_kernel is on the import path of a machine with a GPU; "
        "remove it from PYTHONPATH so the real sgl_kernel (pip package sglang-kernel) is used"
    )

from sgl_kernel._stand_in import unsupported  # noqa: E402

__version__ = "0.0.0+sgl-merge-cpu-stand-in"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For request i, write the next (end-start) slots of `out_cache_loc` into
    `req_to_token[req_pool_indices[i], start[i]:end[i]]` (the slots are consumed in order)."""
    lens = (end_offset - start_offset).long()
    total = int(lens.sum())
    if total == 0:
        return
    first = torch.cumsum(lens, 0) - lens  # offset of each request's slots in out_cache_loc
    rows = torch.repeat_interleave(req_pool_indices.long(), lens)
    pos = torch.arange(total, device=lens.device) - torch.repeat_interleave(first, lens)
    cols = torch.repeat_interleave(start_offset.long(), lens) + pos
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """In every buffer b (base address data_ptrs[b], rows of strides[b] bytes), copy row src_loc[j]
    to row tgt_loc[j] for all j; all sources are read before any target is written."""
    import ctypes

    if tgt_loc.numel() == 0:
        return
    rows = int(torch.maximum(tgt_loc.max(), src_loc.max())) + 1
    src, tgt = src_loc.long(), tgt_loc.long()
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buf[tgt] = buf[src]


# Speculative decoding and the AMX attention backend: not supported by the CPU stand-in.
assign_draft_cache_locs_contiguous_cpu = unsupported("assign_draft_cache_locs_contiguous_cpu", "speculative decoding")
assign_extend_cache_locs_cpu = unsupported("assign_extend_cache_locs_cpu", "speculative decoding")
build_tree_kernel_efficient_cpu = unsupported("build_tree_kernel_efficient_cpu", "speculative decoding")
verify_tree_greedy_cpu = unsupported("verify_tree_greedy_cpu", "speculative decoding")
fill_accept_out_cache_loc_cpu = unsupported("fill_accept_out_cache_loc_cpu", "speculative decoding")
fill_bonus_tokens_cpu = unsupported("fill_bonus_tokens_cpu", "speculative decoding")
rotate_input_ids_cpu = unsupported("rotate_input_ids_cpu", "speculative decoding (multi-layer EAGLE)")
build_draft_decode_metadata_cpu = unsupported("build_draft_decode_metadata_cpu", "the Intel AMX attention backend")

"""ParaThinker checkpoints (arXiv 2509.04475) in SGLang: Qwen2 with one segment embedding per
attention layer, `self_attn.seg_embeddings = nn.Embedding(max_segments, head_dim)`, added to K and
V (not Q) before RoPE and shared by every KV head, as in the authors' vLLM and transformers forks.

A token's segment is a function of the token sequence alone: `<thinkN>` opens path N (segment N,
1-based) and the tokens after it keep it, `<summary>` returns to segment 0, which is also the
prompt's; `</thinkN>` is in segment N and changes nothing after it (in a well-formed sequence it
closes path N, which is in segment N anyway; a stray one sampled inside another path leaves that
path's segment alone, as the authors' per-path segment ids do). So the same tokens always get the
same KV, and SGLang's radix cache stays sound without any namespace. Paths are plain requests from prompt + `<thinkN>` (their positions
start at the prompt's length, as the method wants); the summary is a KV join of the paths
(`sgl_merge.runtime.join`, positions "after_longest": after the prompt and the longest path).

Segment ids are computed on the device in the model's forward from the step's input ids and a
per-request-row state (the segment the row's sequence ended in), so decoding has no host
synchronisation and works under CUDA graphs; the row state is set from the cached prefix's tokens
when a request is prefilled (`init_rows`, called when the batch is built).

A checkpoint is taken for a ParaThinker when its config has `max_segments` or its weights hold
`seg_embeddings`; `architectures` stays `Qwen2ForCausalLM`, as the published one has it.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("sgl_merge")

DEFAULT_MAX_SEGMENTS = 32  # the authors' default
SEG_WEIGHT = "seg_embeddings"
MAX_ROWS = 1 << 16  # request-pool rows the segment state covers (SGLang's pool is max running requests + a few)


def control_tokens(max_paths: int) -> dict[str, int]:
    """Control token text -> the segment it is in (`<thinkN>` and `<summary>` also put what follows
    them there; `</thinkN>` only itself, see `opens_segment`)."""
    tokens = {"<summary>": 0}
    for n in range(1, max_paths + 1):
        tokens[f"<think{n}>"] = n
        tokens[f"</think{n}>"] = n
    return tokens


STRAY_BIAS = -1e4  # logit bias that keeps a control token out of a path


def path_logit_bias(control_ids: dict[str, int], path: int) -> dict[str, float]:
    """SGLang `logit_bias` for sampling path `path` (from 1): every control token but the path's own
    `</think{path}>` made unsampleable. A stray `</think5>` or `<summary>` sampled inside path 7
    (the control tokens' embeddings sit close together in a small model) puts the path off the
    layout its summary was trained on; the authors' vLLM rewrites such tokens, this never samples
    them. `control_ids`: control token text -> id, for those the tokenizer has (`<thinkN>`,
    `</thinkN>`, `<summary>`, `</summary>`)."""
    own = f"</think{path}>"
    return {str(i): STRAY_BIAS for text, i in control_ids.items() if text != own}


def find_control_ids(single) -> dict[str, int]:
    """The control tokens a tokenizer has, text -> id: `<summary>`, `</summary>` and `<thinkN>` /
    `</thinkN>` for N = 1, 2, ... while both exist. `single(text)`: the id of `text` where it is
    one token, else None (a tokenizer, or a server's /tokenize)."""
    ids = {text: i for text in ("<summary>", "</summary>") if (i := single(text)) is not None}
    for n in range(1, DEFAULT_MAX_SEGMENTS + 1):
        pair = {text: single(text) for text in (f"<think{n}>", f"</think{n}>")}
        if None in pair.values():
            break
        ids.update(pair)
    return ids


def opens_segment(text: str) -> bool:
    """Whether a control token sets the segment of the tokens after it (not a `</thinkN>`)."""
    return not text.startswith("</")


def _weight_names(model_path: Path) -> list[str]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names = []
    for f in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def is_parathinker(model_config) -> bool:
    """A Qwen2 checkpoint with ParaThinker's segment embeddings (config field or weights)."""
    hf_config = model_config.hf_config
    if "Qwen2ForCausalLM" not in (getattr(hf_config, "architectures", None) or []):
        return False
    if getattr(hf_config, "max_segments", None) is not None:
        return True
    return _has_segment_weights(str(model_config.model_path))


@functools.cache
def _has_segment_weights(model_path: str) -> bool:
    path = Path(model_path)
    return path.is_dir() and any(SEG_WEIGHT in name for name in _weight_names(path))


class SegmentIds:
    """Per-token segment ids for a forward batch, on the device."""

    def __init__(self, table: torch.Tensor, own: torch.Tensor, rows: torch.Tensor, host_table: dict[int, int]):
        self.table = table  # [vocab] int64: the segment an opening token (<thinkN>, <summary>) sets, else -1
        self.own = own  # [vocab] int64: a closing token's (</thinkN>) own segment, else -1
        self.rows = rows  # [MAX_ROWS] int64: the segment each request-pool row's sequence is in
        self.host_table = host_table  # the opening tokens' segments

    def init_rows(self, reqs, forward_batch) -> None:
        """At a prefill: each row's state is the segment its cached prefix ended in (a host scan of
        that prefix's tokens, once per prefill)."""
        controls = np.fromiter(self.host_table, dtype=np.int64)
        states = []
        for req, prefix_len in zip(reqs, forward_batch.extend_prefix_lens_cpu):
            prefix = np.asarray(req.full_untruncated_fill_ids[: int(prefix_len)], dtype=np.int64)
            found = np.flatnonzero(np.isin(prefix, controls))
            states.append(self.host_table[int(prefix[found[-1]])] if found.size else 0)
        rows = self.rows
        rows[forward_batch.req_pool_indices] = torch.tensor(states, dtype=torch.int64).to(rows.device, non_blocking=True)

    def __call__(self, input_ids: torch.Tensor, forward_batch) -> torch.Tensor:
        marks, own = self.table[input_ids], self.own[input_ids]
        rows = self.rows
        if input_ids.numel() == 0:
            return marks.clamp_min(0)
        pool = forward_batch.req_pool_indices
        mode = forward_batch.forward_mode
        if mode.is_decode() or mode.is_idle():
            state = torch.where(marks >= 0, marks, rows[pool])
            rows[pool] = state
            return torch.where(own >= 0, own, state)
        # Extend: a token's state is that of the last opening token at or before it in its own
        # request, else the row's state; each request's first token is defined, so the forward
        # fill never crosses from one request into the next.
        starts = forward_batch.extend_start_loc
        first = marks[starts]
        marks = marks.clone()
        marks[starts] = torch.where(first >= 0, first, rows[pool])
        index = torch.arange(marks.numel(), device=marks.device)
        last = torch.cummax(torch.where(marks >= 0, index, torch.zeros_like(index)), dim=0).values
        state = marks[last]
        ends = starts + forward_batch.extend_seq_lens - 1
        rows[pool] = state[ends]
        return torch.where(own >= 0, own, state)


def _segmented_attention_forward(self, positions, hidden_states, forward_batch):
    """Qwen2Attention.forward with the segment embedding added to K and V before RoPE."""
    qkv, _ = self.qkv_proj(hidden_states)
    q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    seg = self.seg_embeddings(forward_batch.sgl_segment_ids).unsqueeze(1)  # [tokens, 1, head_dim]
    k = (k.view(-1, self.num_kv_heads, self.head_dim) + seg).view_as(k)
    v = (v.view(-1, self.num_kv_heads, self.head_dim) + seg).view_as(v)
    q, k = self.rotary_emb(positions, q, k)
    attn_output = self.attn(q, k, v, forward_batch)
    output, _ = self.o_proj(attn_output)
    return output


def _control_ids(config, max_paths: int) -> tuple[dict[int, int], dict[int, int]]:
    """Token id -> segment for the control tokens the checkpoint's tokenizer has: the opening
    ones (which set the segment of what follows) and the closing ones."""
    from transformers import AutoTokenizer

    path = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    found = {text: (vocab[text], seg) for text, seg in control_tokens(max_paths).items()
             if text in vocab and vocab[text] < config.vocab_size}
    if not found:
        logger.warning("sgl-merge: ParaThinker checkpoint without <thinkN> / <summary> tokens in its tokenizer: "
                       "every token is in segment 0")
    opening = {i: seg for text, (i, seg) in found.items() if opens_segment(text)}
    return opening, {i: seg for text, (i, seg) in found.items() if not opens_segment(text)}


@functools.cache
def model_class():
    """The SGLang model class (built on first use: it imports SGLang's Qwen2)."""
    from sglang.srt.models.qwen2 import Qwen2ForCausalLM

    class ParaThinkerForCausalLM(Qwen2ForCausalLM):
        def __init__(self, config, quant_config=None, prefix: str = ""):
            super().__init__(config, quant_config=quant_config, prefix=prefix)
            segments = getattr(config, "max_segments", None) or DEFAULT_MAX_SEGMENTS
            for layer in self.model.layers:
                attn = getattr(layer, "self_attn", None)
                if attn is None:  # a pipeline stage's missing layer
                    continue
                attn.seg_embeddings = nn.Embedding(segments, attn.head_dim)
                nn.init.zeros_(attn.seg_embeddings.weight)  # as the authors: absent weights = plain Qwen2
                attn.forward = _segmented_attention_forward.__get__(attn)
            opening, closing = _control_ids(config, segments - 1)
            for name, tokens in (("sgl_segment_table", opening), ("sgl_segment_own", closing)):
                table = torch.full((config.vocab_size,), -1, dtype=torch.int64)
                for token, seg in tokens.items():
                    table[token] = seg
                self.register_buffer(name, table, persistent=False)
            # Allocated once with the model (device graphs capture its address): 512 KiB.
            self.register_buffer("sgl_segment_rows", torch.zeros(MAX_ROWS, dtype=torch.int64), persistent=False)
            self.sgl_segments = SegmentIds(self.sgl_segment_table, self.sgl_segment_own, self.sgl_segment_rows, opening)

        def forward(self, input_ids, positions, forward_batch, *args, **kwargs):
            # The buffers, wherever the model was moved.
            segs = self.sgl_segments
            segs.table, segs.own, segs.rows = self.sgl_segment_table, self.sgl_segment_own, self.sgl_segment_rows
            forward_batch.sgl_segment_ids = self.sgl_segments(input_ids, forward_batch)
            return super().forward(input_ids, positions, forward_batch, *args, **kwargs)

    return ParaThinkerForCausalLM

"""ParaThinker checkpoints (arXiv 2509.04475) in SGLang: Qwen2 with one segment embedding per
attention layer, `self_attn.seg_embeddings = nn.Embedding(max_segments, head_dim)`, added to K and
V (not Q) before RoPE and shared by every KV head, as in the authors' vLLM and transformers forks.

A token's segment is a function of the token sequence alone: `<thinkN>` opens path N (segment N,
1-based) and the tokens after it keep it; `</thinkN>` is in segment N and changes nothing after it
(in a well-formed sequence it closes path N, which is in segment N anyway; a stray one sampled
inside another path leaves that path's segment alone, as the authors' per-path segment ids do);
`<summary>` starts the summary, which is segment 0 (the prompt's) from there to the end, whatever
control tokens it contains (the authors' ids are per stage: a `<think2>` or `</think5>` sampled in
a summary does not move it into a path). So the same tokens always get the same KV, and SGLang's
radix cache stays sound without any namespace. Paths are plain requests from prompt + `<thinkN>` (their positions
start at the prompt's length, as the method wants); the summary is a KV join of the paths
(`sgl_merge.runtime.join`, positions "after_longest": after the prompt and the longest path). The
control tokens, and how requests are laid out with them, are `sgl_merge.contract.parathink_layout`.

Segment ids are computed on the device from the step's input ids and a per-request-row state (the
segment the row's sequence ended in, or "in the summary"), without host synchronisation, in
`prepare_for_forward`, which SGLang's model runner calls before every forward (eager, decode graph
replay, prefill graph replay) and the prefill graph runner at capture. They are written with
`copy_` into one persistent buffer that the attention layers read a slice of: SGLang's prefill CUDA
graph captures only the inner Qwen2Model, and a graph replays the addresses it captured, so the
ids must be in the same tensor at every step. The row state is set from the cached prefix's tokens
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

from sgl_merge.contract.parathink_layout import DEFAULT_MAX_SEGMENTS, SUMMARY_OPEN, control_tokens, opens_segment

logger = logging.getLogger("sgl_merge")

SEG_WEIGHT = "seg_embeddings"
MAX_ROWS = 1 << 16  # request-pool rows the segment state covers (SGLang's pool is max running requests + a few)
MIN_TOKENS = 1 << 17  # the least tokens of one forward the segment-id buffer holds (int32: 512 KiB)
SUMMARY = 1 << 20  # the state inside a summary (above every segment): segment 0, whatever control tokens follow


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
    """A Qwen2 checkpoint with ParaThinker's segment embeddings (config field or weights), given as
    a local folder or a hub id."""
    hf_config = model_config.hf_config
    if "Qwen2ForCausalLM" not in (getattr(hf_config, "architectures", None) or []):
        return False
    if getattr(hf_config, "max_segments", None) is not None:
        return True
    return _has_segment_weights(str(model_config.model_path), getattr(model_config, "revision", None))


@functools.cache
def _has_segment_weights(model_path: str, revision: str | None = None) -> bool:
    path = Path(model_path)
    names = _weight_names(path) if path.is_dir() else _hub_weight_names(model_path, revision)
    return any(SEG_WEIGHT in name for name in names)


def _hub_weight_names(repo: str, revision: str | None) -> list[str]:
    """A hub checkpoint's weight names: from the local hub cache where it is there (SGLang downloads
    there), else from the hub's safetensors headers (no weights are downloaded)."""
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True,
                                                  allow_patterns=["*.json", "*.safetensors"])
        if names := _weight_names(Path(local)):
            return names
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub
        pass
    try:
        return list(huggingface_hub.get_safetensors_metadata(repo, revision=revision).weight_map)
    except Exception as e:  # noqa: BLE001 - offline, private, not safetensors: say how to make it certain
        logger.warning("sgl-merge: could not read the weight names of %s to tell whether it is a ParaThinker "
                       "(%s: %s); it loads as a plain Qwen2 unless its config.json has max_segments",
                       repo, type(e).__name__, e)
        return []


class SegmentIds:
    """Per-token segment ids of each forward, computed on the device into one persistent buffer.

    Row states: N >= 0 (the sequence is in segment N: the prompt, or path N), or SUMMARY (in a
    summary: segment 0 from its `<summary>` to the end)."""

    def __init__(self, table: torch.Tensor, own: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                 host_table: dict[int, int]):
        self.table = table  # [vocab] int64: the state an opening token sets (N for <thinkN>, SUMMARY), else -1
        self.own = own  # [vocab] int64: a closing token's (</thinkN>) own segment, else -1
        self.rows = rows  # [MAX_ROWS] int64: the state of each request-pool row's sequence
        self.ids = ids  # [capacity] int32: the segment ids of the forward in progress (its first tokens)
        self.host_table = host_table  # the opening tokens' states

    def init_rows(self, reqs, forward_batch) -> None:
        """At a prefill: each row's state is that of its cached prefix (a host scan of that prefix's
        tokens, once per prefill)."""
        controls = np.fromiter(self.host_table, dtype=np.int64)
        summary = [t for t, state in self.host_table.items() if state == SUMMARY]
        states = []
        for req, prefix_len in zip(reqs, forward_batch.extend_prefix_lens_cpu):
            prefix = np.asarray(req.full_untruncated_fill_ids[: int(prefix_len)], dtype=np.int64)
            if summary and np.isin(prefix, summary).any():
                states.append(SUMMARY)
                continue
            found = np.flatnonzero(np.isin(prefix, controls))
            states.append(self.host_table[int(prefix[found[-1]])] if found.size else 0)
        rows = self.rows
        rows[forward_batch.req_pool_indices] = torch.tensor(states, dtype=torch.int64).to(rows.device, non_blocking=True)

    def prepare(self, forward_batch, update_rows: bool = True) -> None:
        """Write this forward's segment ids into the buffer (`copy_`: its address never changes) and
        advance the rows' states, unless `update_rows` is False (a graph capture's dummy batch)."""
        input_ids = forward_batch.input_ids
        n = input_ids.numel()
        if n > self.ids.numel():
            raise RuntimeError(f"sgl-merge: a forward of {n} tokens is more than the ParaThinker segment-id buffer "
                               f"holds ({self.ids.numel()}); lower --max-prefill-tokens / --chunked-prefill-size")
        if n:
            self.ids[:n].copy_(self.compute(input_ids, forward_batch, update_rows))

    def compute(self, input_ids: torch.Tensor, forward_batch, update_rows: bool = True) -> torch.Tensor:
        """The segment id of every token of the step (device ops only: no host sync)."""
        marks, own = self.table[input_ids], self.own[input_ids]
        rows = self.rows
        pool = forward_batch.req_pool_indices
        mode = forward_batch.forward_mode
        if mode.is_decode() or mode.is_idle():
            prev = rows[pool]
            state = torch.where((marks >= 0) & (prev != SUMMARY), marks, prev)
            last = state
        else:
            state = self._extend_states(marks, rows[pool], forward_batch)
            last = state[forward_batch.extend_start_loc + forward_batch.extend_seq_lens - 1]
        if update_rows:
            rows[pool] = last
        return torch.where(state == SUMMARY, 0, torch.where(own >= 0, own, state)).to(self.ids.dtype)

    @staticmethod
    def _extend_states(marks: torch.Tensor, start_states: torch.Tensor, forward_batch) -> torch.Tensor:
        """Each token's state in an extend: that of the last opening token at or before it in its
        own request (else its row's state), and SUMMARY from a request's first `<summary>` on (or
        throughout, if its row was in a summary already). Each request's first token is defined,
        so no forward fill crosses from one request into the next."""
        starts = forward_batch.extend_start_loc
        first = marks[starts]
        marks = marks.clone()
        marks[starts] = torch.where((first >= 0) & (start_states != SUMMARY), first, start_states)
        index = torch.arange(marks.numel(), device=marks.device)
        zero = torch.zeros_like(index)
        state = marks[torch.cummax(torch.where(marks >= 0, index, zero), dim=0).values]
        # In a summary from the request's first SUMMARY mark on: count those marks since its start.
        is_start = torch.zeros_like(marks, dtype=torch.bool)
        is_start[starts] = True
        start_of = torch.cummax(torch.where(is_start, index, zero), dim=0).values
        in_summary = (marks == SUMMARY).to(torch.int32)
        seen = torch.cumsum(in_summary, dim=0)
        before = seen[start_of] - in_summary[start_of]
        return torch.where(seen - before > 0, SUMMARY, state)


def _segmented_attention_forward(self, positions, hidden_states, forward_batch):
    """Qwen2Attention.forward with the segment embedding added to K and V before RoPE. The ids are
    the first rows of the model's persistent buffer (under a graph, of the padded token count: the
    padding reads stale but valid ids, and its outputs are discarded)."""
    qkv, _ = self.qkv_proj(hidden_states)
    q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    ids = self.sgl_segments.ids[: hidden_states.shape[0]]
    seg = self.seg_embeddings(ids).unsqueeze(1)  # [tokens, 1, head_dim]
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
    opening = {i: (SUMMARY if text == SUMMARY_OPEN else seg) for text, (i, seg) in found.items() if opens_segment(text)}
    return opening, {i: seg for text, (i, seg) in found.items() if not opens_segment(text)}


def _token_capacity(config) -> int:
    """Tokens of one forward the segment-id buffer holds: a whole context plus a full prefill batch."""
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    return max(MIN_TOKENS, context + (1 << 16))


def _capturing_prefill_graph() -> bool:
    """Whether SGLang's prefill graph runner is capturing (its dummy batch must not touch row states)."""
    from sglang.srt.runtime_context import get_flags

    return bool(getattr(get_flags().dp, "capturing_prefill_graph", False))


@functools.cache
def model_class():
    """The SGLang model class (built on first use: it imports SGLang's Qwen2)."""
    from sglang.srt.models.qwen2 import Qwen2ForCausalLM

    class ParaThinkerForCausalLM(Qwen2ForCausalLM):
        def __init__(self, config, quant_config=None, prefix: str = ""):
            super().__init__(config, quant_config=quant_config, prefix=prefix)
            segments = getattr(config, "max_segments", None) or DEFAULT_MAX_SEGMENTS
            opening, closing = _control_ids(config, segments - 1)
            for name, tokens in (("sgl_segment_table", opening), ("sgl_segment_own", closing)):
                table = torch.full((config.vocab_size,), -1, dtype=torch.int64)
                for token, seg in tokens.items():
                    table[token] = seg
                self.register_buffer(name, table, persistent=False)
            # Allocated once with the model (graphs capture their addresses): 512 KiB of row states,
            # and the segment ids of the forward in progress.
            self.register_buffer("sgl_segment_rows", torch.zeros(MAX_ROWS, dtype=torch.int64), persistent=False)
            self.register_buffer("sgl_segment_ids", torch.zeros(_token_capacity(config), dtype=torch.int32),
                                 persistent=False)
            self.sgl_segments = SegmentIds(self.sgl_segment_table, self.sgl_segment_own, self.sgl_segment_rows,
                                           self.sgl_segment_ids, opening)
            for layer in self.model.layers:
                attn = getattr(layer, "self_attn", None)
                if attn is None:  # a pipeline stage's missing layer
                    continue
                attn.seg_embeddings = nn.Embedding(segments, attn.head_dim)
                nn.init.zeros_(attn.seg_embeddings.weight)  # as the authors: absent weights = plain Qwen2
                attn.sgl_segments = self.sgl_segments  # shared, not a submodule
                attn.forward = _segmented_attention_forward.__get__(attn)

        def _apply(self, fn, *args, **kwargs):
            # .to() / .cuda() replace the buffers: the attention layers' shared view follows.
            out = super()._apply(fn, *args, **kwargs)
            segs = getattr(self, "sgl_segments", None)
            if segs is None:
                return out
            segs.table, segs.own, segs.rows, segs.ids = (self.sgl_segment_table, self.sgl_segment_own,
                                                         self.sgl_segment_rows, self.sgl_segment_ids)
            return out

        def prepare_for_forward(self, forward_batch) -> None:
            """Called by SGLang's model runner before every forward and by the prefill graph runner
            at capture: the step's segment ids, into the persistent buffer."""
            self.sgl_segments.prepare(forward_batch, update_rows=not _capturing_prefill_graph())

    return ParaThinkerForCausalLM

"""Independent references for merged decoding: Hugging Face transformers on the same weights."""

from __future__ import annotations

import math

import torch

# Greedy steps whose top two merged scores lie closer than this are near-ties: SGLang's CPU kernels
# and transformers' may order them differently, so either token is accepted there.
TIE_TOLERANCE = 1e-4


def merge_rows(rows: torch.Tensor, mode: str, weights: list[float] | None = None, tau: float = 1.0) -> torch.Tensor:
    """Merge [K, V] next-token logits into one [V] row, as the contract defines each mode (float64;
    "entropy" weighs member k by w_k * exp(-H_k / tau), H_k the entropy of its own softmax)."""
    w = torch.tensor(weights or [1.0] * rows.shape[0], dtype=torch.float64)
    w = (w / w.sum())[:, None]
    rows = rows.double()
    if mode == "logits":
        return (w * rows).sum(0)
    if mode == "logprobs":
        return (w * torch.log_softmax(rows, -1)).sum(0)
    if mode == "probs":
        return torch.log((w * torch.softmax(rows, -1)).sum(0))
    if mode == "entropy":
        p = torch.softmax(rows, -1)
        entropy = -(p * torch.log_softmax(rows, -1)).nan_to_num().sum(-1, keepdim=True)
        v = w * torch.exp(-entropy / tau)
        return (v / v.sum() * rows).sum(0)
    raise ValueError(mode)


@torch.no_grad()
def next_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    return torch.stack([model(torch.tensor([c])).logits[0, -1].float() for c in contexts])


def check_merged_greedy(model, contexts, produced, mode, weights=None, tau=1.0):
    """Replay `produced` (the server's merged greedy tokens) against the reference: at each step the
    token must be the argmax of the merged reference row (up to near-ties). Returns the step count."""
    answer: list[int] = []
    for step, token in enumerate(produced):
        merged = merge_rows(next_logits(model, [c + answer for c in contexts]), mode, weights, tau)
        best = int(merged.argmax())
        if token != best:
            gap = float(merged[best] - merged[token])
            assert gap < TIE_TOLERANCE, (
                f"step {step}: server chose {token}, reference argmax {best} (score gap {gap:.3g})"
            )
        answer.append(token)
    return len(answer)


def merged_greedy(model, contexts, steps, mode, weights=None, tau=1.0) -> list[int]:
    """The reference's own merged greedy answer of `steps` tokens."""
    answer: list[int] = []
    for _ in range(steps):
        answer.append(int(merge_rows(next_logits(model, [c + answer for c in contexts]), mode, weights, tau).argmax()))
    return answer


def own_choice_agreement(model, contexts, produced) -> list[tuple[float, float]]:
    """For each member, the (lowest, highest) fraction of steps at which its own next-token argmax
    (its context plus the merged answer so far) equals the merged token; the two differ only where
    the member's own top two scores are a near-tie."""
    bounds = []
    for ctx in contexts:
        sure = near_tie = 0
        for step, token in enumerate(produced):
            row = next_logits(model, [ctx + produced[:step]])[0].double()
            top = torch.topk(row, 2)
            if float(top.values[0] - top.values[1]) < TIE_TOLERANCE:
                near_tie += int(token in top.indices.tolist())
            else:
                sure += int(int(top.indices[0]) == token)
        bounds.append((sure / len(produced), (sure + near_tie) / len(produced)))
    return bounds


@torch.no_grad()
def check_joined_greedy(model, sources, prompt_len, continuation, produced, positions="after_longest", banned=()):
    """Replay `produced` (a joined request's greedy tokens) against Hugging Face `past_key_values`
    concatenated as the join defines: source 0's KV of the shared prompt, then every source's KV from
    `prompt_len` on (each computed by a plain forward of that source alone), then the continuation
    at positions after prompt + the longest part ("after_longest") or after the whole concatenation
    ("sequential"). Each produced token must be the reference argmax, up to near-ties, over the tokens
    the request could sample (`banned`: ids its logit_bias made unsampleable). `model` is a
    transformers model or a ParaThinkerReference (each token then in the segment its sequence gives it)."""
    from transformers import DynamicCache

    caches = [_forward(model, s, [], use_cache=True).past_key_values for s in sources]
    parts = [len(s) - prompt_len for s in sources]
    context = list(sources[0][:prompt_len]) + [t for s in sources for t in s[prompt_len:]]
    joined = DynamicCache()
    for layer in range(len(caches[0].layers)):
        keys = [caches[0].layers[layer].keys[:, :, :prompt_len], *(c.layers[layer].keys[:, :, prompt_len:] for c in caches)]
        values = [caches[0].layers[layer].values[:, :, :prompt_len],
                  *(c.layers[layer].values[:, :, prompt_len:] for c in caches)]
        joined.update(torch.cat(keys, 2), torch.cat(values, 2), layer)
    kv_len = prompt_len + sum(parts)
    position = prompt_len + (max(parts) if positions == "after_longest" else sum(parts))
    feed = list(continuation)
    for step, token in enumerate(produced):
        logits = _forward(model, feed, context, past_key_values=joined, use_cache=True,
                          position_ids=torch.arange(position, position + len(feed))[None],
                          attention_mask=torch.ones(1, kv_len + len(feed), dtype=torch.long)).logits[0, -1].double()
        logits[list(banned)] = -math.inf
        kv_len, position, context = kv_len + len(feed), position + len(feed), context + feed
        best = int(logits.argmax())
        if token != best:
            gap = float(logits[best] - logits[token])
            assert gap < TIE_TOLERANCE, f"step {step}: server chose {token}, reference argmax {best} (gap {gap:.3g})"
        feed = [token]
    return len(produced)


def _forward(model, ids, context, **kwargs):
    """One forward of `ids` after `context` (the tokens before them, for a ParaThinker's segments)."""
    if isinstance(model, ParaThinkerReference):
        return model(ids, model.segments(list(context) + list(ids))[len(context):], **kwargs)
    return model(torch.tensor([ids]), **kwargs)


def check_plain_greedy(model, ids, produced):
    """Replay a plain request's greedy tokens against a from-scratch forward of `ids` + the tokens so far."""
    return check_merged_greedy(model, [list(ids)], produced, "logits")


class ParaThinkerReference:
    """Hugging Face transformers' Qwen2 on a ParaThinker checkpoint, with its segment embeddings
    applied as the authors' transformers fork does: E_layer[segment] added to the k_proj and v_proj
    outputs (before RoPE; one head_dim vector repeated over the KV heads). Call it with token ids,
    their segments and the usual keyword arguments (position_ids, past_key_values, ...)."""

    def __init__(self, path):
        from pathlib import Path

        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # without segments
        weights = load_file(str(Path(path) / "model.safetensors"))
        self.tables = [weights[f"model.layers.{i}.self_attn.seg_embeddings.weight"].float()
                       for i in range(len(self.model.model.layers))]
        self.head_dim = self.tables[0].shape[1]
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        self.opens = {vocab[t]: int(t[6:-1]) for t in vocab if t.startswith("<think") and t[6:-1].isdigit()}
        self.closes = {vocab[t]: int(t[7:-1]) for t in vocab if t.startswith("</think") and t[7:-1].isdigit()}
        self.summary = vocab["<summary>"]
        self._segments = None
        for i, layer in enumerate(self.model.model.layers):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.register_forward_hook(lambda _m, _in, out, i=i: out + self.tables[i][self._segments].repeat(
                    1, 1, out.shape[-1] // self.head_dim))

    def segments(self, ids, state: int = 0) -> list[int]:
        """Segment of every token: <thinkN> .. </thinkN> are path N; from <summary> to the end all is
        segment 0 (the prompt's), control tokens sampled in the summary included (per-stage ids)."""
        out, in_summary = [], False
        for t in ids:
            if t == self.summary:
                in_summary = True
            elif t in self.opens and not in_summary:
                state = self.opens[t]
            out.append(0 if in_summary else self.closes.get(t, state))
        return out

    @torch.no_grad()
    def __call__(self, ids, segments, **kwargs):
        self._segments = torch.tensor([segments])
        return self.model(torch.tensor([ids]), **kwargs)

    @torch.no_grad()
    def check_greedy(self, ids, produced):
        """A plain request's greedy tokens against from-scratch forwards with each token's segment."""
        for step, token in enumerate(produced):
            seq = list(ids) + list(produced[:step])
            logits = self(seq, self.segments(seq)).logits[0, -1].double()
            best = int(logits.argmax())
            if token != best:
                gap = float(logits[best] - logits[token])
                assert gap < TIE_TOLERANCE, f"step {step}: server chose {token}, reference argmax {best} (gap {gap:.3g})"
        return len(produced)

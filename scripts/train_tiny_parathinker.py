"""Train the bundled tiny reasoner into a tiny ParaThinker (arXiv 2509.04475): the second stage of
the shipped model (`sgl_merge/tiny_reasoner/model/`), after `scripts/train_tiny_reasoner.py`.

What it adds to the base model, in ParaThinker's layout (what `sgl_merge.models.parathinker`
serves): control tokens `<think1>`..`<think8>`, `</think1>`..`</think8>`, `<summary>`,
`</summary>`; per attention layer `self_attn.seg_embeddings` [9, head_dim], added to K and V
before RoPE (segment 0 = prompt and summary, i = path i); `max_segments` in config.json. Segment
0's row is held at zero, so plain requests (`<think>` .. `</think>`, no path tokens) run exactly
the base model's computation, and single / vote / ThinkMerge keep what the base was trained for.

What it trains, on the same tasks (`chain` and `parts`, held-out questions skipped):
- the base's own examples (`--plain-batch` per step), so the plain model does not drift;
- ParaThinker examples (`--para-batch` per step): the prompt, P paths (P uniform in 2..8), the
  summary. Each path is the problem's chain written line by line with slips: every line's result
  digit is wrong with probability s (drawn per path around the base's slip rate at temperature
  0.7), the next line going on from the written value, as a sampled trace does. The path's loss is
  the base's (soft targets on the correct result of the line as written); the summary's target is
  the true answer, so it learns to read the answer off P imperfect paths.
  The training mask is ParaThinker's (`train/custom_data_collator.py`): causal, each path sees the
  prompt and itself, the summary sees everything. Positions: every path starts at the prompt's
  length, the summary after the longest path ("after_longest", the runtime join's default).
  No path holds another control token; at inference no path samples one either
  (`sgl_merge.contract.parathink_layout.path_logit_bias`: without it, a stray `</think5>` in one of 8
  paths took the demo's chain summary@8 from 39 to 20 of 40 right).

Reproducible from `--seed` and `--steps` (`--minutes` is a safety cap); the base must be a plain
tiny reasoner (not already ParaThinker-trained):

    python scripts/train_tiny_reasoner.py --out /tmp/base        # or the shipped model's git history
    python scripts/train_tiny_parathinker.py --base /tmp/base    # writes the shipped model
    python scripts/train_tiny_parathinker.py --eval-only --out sgl_merge/tiny_reasoner/model
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import train_tiny_reasoner as base
from _training import add_run_args, parse_args, train
from sgl_merge.contract.parathink_layout import SUMMARY_CLOSE, SUMMARY_OPEN, THINK_CLOSE, THINK_OPEN, control_tokens
from sgl_merge.models.parathinker import SEG_WEIGHT
from sgl_merge.tiny_reasoner import parts, task

PATHS = 8
CONTROLS = [t for t in control_tokens(PATHS) if t != SUMMARY_OPEN] + [SUMMARY_OPEN, SUMMARY_CLOSE]
LINE = re.compile(r"^([A-Z]?)(\d+):(\d)([+*-])(\d)=(\d)$")


def slip_rate(uncertainty: float, temperature: float) -> float:
    """Chance that a sampled result digit is wrong, for a model that learned the soft targets:
    (1 - u) on the right digit, u / 9 on each other, sharpened by the sampling temperature."""
    right, wrong = (1 - uncertainty) ** (1 / temperature), 9 * (uncertainty / 9) ** (1 / temperature)
    return wrong / (right + wrong)


def slipped_thinking(thinking: str, slip: float, rng: random.Random) -> tuple[str, str]:
    """The problem's thinking as a sampled trace writes it (each result digit wrong with
    probability `slip`, later lines going on from what was written), and the same lines with
    every result right for its line's own operands (the training labels)."""
    written, right, value = [], [], {}
    for line in thinking.split("\n"):
        chain, step, x, op, b, _ = LINE.match(line).groups()
        x = value.get(chain, int(x))
        y = task.apply_op(x, op, int(b))
        w = y if rng.random() >= slip else rng.choice([d for d in range(task.MODULUS) if d != y])
        written.append(f"{chain}{step}:{x}{op}{b}={w}")
        right.append(f"{chain}{step}:{x}{op}{b}={y}")
        value[chain] = w
    return "\n".join(written), "\n".join(right)


def final_answer(thinking: str) -> str:
    """What a path's last lines say: the last value of each chain, comma-separated."""
    last = {}
    for line in thinking.split("\n"):
        last[LINE.match(line).group(1)] = line[-1]
    return ",".join(last.values())


class Segments:
    """ParaThinker's segment embeddings on a Hugging Face Qwen2: per layer an `nn.Embedding`
    (saved as `model.layers.{i}.self_attn.seg_embeddings.weight`) added to the k_proj and v_proj
    outputs for the segment ids set before each forward (None: a plain forward, nothing added)."""

    def __init__(self, model, max_segments: int):
        self.ids = None
        for layer in model.model.layers:
            attn = layer.self_attn
            if not hasattr(attn, SEG_WEIGHT):
                attn.seg_embeddings = nn.Embedding(max_segments, attn.head_dim)
                nn.init.zeros_(attn.seg_embeddings.weight)
            table = attn.seg_embeddings
            # Segment 0 stays the base model: its row is zero and gets no gradient.
            table.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), 0.0))
            for proj in (attn.k_proj, attn.v_proj):
                proj.register_forward_hook(lambda _m, _in, out, t=table: self._add(out, t))
        model.config.max_segments = max_segments

    def _add(self, out, table):
        if self.ids is None:
            return out
        emb = table(self.ids)  # [B, L, head_dim], repeated over the KV heads
        return out + emb.repeat(1, 1, out.shape[-1] // emb.shape[-1])


class ParaBatches:
    """ParaThinker training sequences: prompt, P slipped paths, the summary, packed into one
    sequence each with ParaThinker's mask, positions and segments."""

    def __init__(self, tok, seed: int, batch_size: int, exclude: set[str], parts_fraction: float, slip: float):
        self.tok, self.rng, self.batch_size = tok, random.Random(seed + 1), batch_size
        self.exclude, self.parts_fraction, self.slip = exclude, parts_fraction, slip
        self.eq_id = tok.convert_tokens_to_ids("=")
        self.pad_id = tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def sequence(self, problem: dict, written: list[str], right: list[str], answer: bool = True) -> dict:
        """One packed sequence: token ids, labels, block (0 prompt, i path i, -1 summary),
        positions and segments; the summary only opened (`<summary>`) without `answer`."""
        prompt = self.ids(task.prompt_text(problem["question"]))
        ids, labels, block, pos, seg = list(prompt), list(prompt), [0] * len(prompt), list(range(len(prompt))), [0] * len(prompt)
        longest = 0
        for i, (w, r) in enumerate(zip(written, right), 1):
            path, label = self.ids(task.path_text(i, w)), self.ids(task.path_text(i, r))
            assert len(path) == len(label), "a slipped digit changed the tokenization"
            ids += path
            labels += label
            block += [i] * len(path)
            pos += range(len(prompt), len(prompt) + len(path))
            seg += [i] * len(path)
            longest = max(longest, len(path))
        summary = self.ids(task.summary_text(problem["answer"]) if answer else "<summary>")
        ids += summary
        labels += summary
        block += [-1] * len(summary)
        start = len(prompt) + longest
        pos += range(start, start + len(summary))
        seg += [0] * len(summary)
        return {"ids": ids, "labels": labels, "block": block, "pos": pos, "seg": seg}

    def draw(self, paths: int | None = None, slip: float | None = None) -> tuple[dict, list[str], dict]:
        """A problem, P slipped paths of it, and the packed sequence."""
        while True:
            make = parts.make_problem if self.rng.random() < self.parts_fraction else task.make_problem
            problem = make(self.rng)
            if problem["question"] not in self.exclude:
                break
        return self.paths_of(problem, paths, slip)

    def paths_of(self, problem: dict, paths: int | None = None, slip: float | None = None, answer: bool = True):
        paths = paths or self.rng.randint(2, PATHS)
        written, right = [], []
        for _ in range(paths):
            s = slip if slip is not None else self.slip * self.rng.uniform(0.5, 1.5)
            w, r = slipped_thinking(problem["thinking"], s, self.rng)
            written.append(w)
            right.append(r)
        return problem, written, self.sequence(problem, written, right, answer)

    def next(self):
        return collate([self.draw()[2] for _ in range(self.batch_size)], self.pad_id, self.eq_id)


def collate(seqs: list[dict], pad_id: int, eq_id: int):
    """Pad a batch of packed sequences: ids, labels, the 4D boolean mask (True = may attend),
    positions, segments, and the loss masks (a label is trained where it continues its own path or
    the summary; soft where it is a path line's result digit)."""
    width = max(len(s["ids"]) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = ids.clone()
    block = torch.full((n, width), -2, dtype=torch.long)  # -2: padding
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        m = len(s["ids"])
        ids[i, :m], labels[i, :m] = torch.tensor(s["ids"]), torch.tensor(s["labels"])
        block[i, :m], pos[i, :m], seg[i, :m] = torch.tensor(s["block"]), torch.tensor(s["pos"]), torch.tensor(s["seg"])
    q, k = block[:, :, None], block[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (k != -2) & ((k == 0) | (k == q) | (q == -1))
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    same = (block[:, 1:] == block[:, :-1]) & (block[:, :-1] != 0) & (block[:, :-1] != -2)
    target = torch.cat([torch.zeros_like(same[:, :1]), same], dim=1)
    soft = target & torch.cat([torch.zeros_like(same[:, :1]), ids[:, :-1] == eq_id], dim=1) & (block > 0)
    return ids, labels, mask[:, None], pos, seg, target, soft


def add_layout(model, tok):
    """The base model and tokenizer with ParaThinker's control tokens and segment embeddings."""
    tok.add_tokens(CONTROLS, special_tokens=True)
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    return Segments(model, PATHS + 1)


@torch.no_grad()
def summarize_greedy(model, segments: Segments, tok, seqs: list[dict], max_tokens: int) -> list[str]:
    """Greedy summaries after `<summary>` for packed sequences that end in it (a full forward per
    token with ParaThinker's mask: the reference computation, no cache)."""
    eos, eq_id = tok.eos_token_id, tok.convert_tokens_to_ids("=")
    seqs = [dict(s) for s in seqs]
    out = [[] for _ in seqs]
    for _ in range(max_tokens):
        ids, _, mask, pos, seg, _, _ = collate(seqs, tok.pad_token_id, eq_id)
        segments.ids = seg
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        segments.ids = None
        for i, s in enumerate(seqs):
            if out[i] and out[i][-1] == eos:
                continue
            t = int(logits[i, len(s["ids"]) - 1].argmax())
            out[i].append(t)
            for key, v in (("ids", t), ("labels", t), ("block", -1), ("pos", s["pos"][-1] + 1), ("seg", 0)):
                s[key] = s[key] + [v]
    return tok.batch_decode(out, skip_special_tokens=False)


def evaluate_summary(model, segments, tok, problems, is_correct, slip: float, ks=(2, 4, 8), seed: int = 0,
                     log=print) -> dict:
    """The summary over k slipped paths (at the base model's sampled slip rate) against the
    majority vote of the same paths' own final values, on held-out problems."""
    batches = ParaBatches(tok, seed, 0, set(), 0.0, slip)
    res = {}
    for k in ks:
        seqs, votes = [], 0
        for p in problems:
            _, written, seq = batches.paths_of(p, k, slip, answer=False)
            seqs.append(seq)
            answers = [final_answer(w) for w in written]
            top = max(collections.Counter(answers).items(), key=lambda kv: (kv[1], -answers.index(kv[0])))[0]
            votes += is_correct(f"\\boxed{{{top}}}", p["answer"])
        texts = summarize_greedy(model, segments, tok, seqs, 16)
        acc = sum(is_correct(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)
        res[f"summary@{k}"], res[f"vote@{k}"] = acc, votes / len(problems)
    res["slip"] = round(slip, 4)
    log(json.dumps(res))
    return res


def load(path: Path):
    """Model and tokenizer; a ParaThinker's segment embeddings too (transformers' Qwen2 skips them)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    segments = None
    if getattr(model.config, "max_segments", None) is not None:
        segments = Segments(model, model.config.max_segments)
        weights = load_file(str(path / "model.safetensors"))
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.seg_embeddings.weight.data.copy_(weights[f"model.layers.{i}.self_attn.{SEG_WEIGHT}.weight"])
    return model, AutoTokenizer.from_pretrained(path), segments


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="a plain tiny reasoner (train_tiny_reasoner.py's output)")
    ap.add_argument("--out", type=Path, default=task.MODEL_DIR)
    ap.add_argument("--seed", type=int, default=0)
    add_run_args(ap, steps=600, minutes=40.0, lr=1e-3, warmup=30, log_every=25)
    ap.add_argument("--plain-batch", type=int, default=32)
    ap.add_argument("--para-batch", type=int, default=8)
    ap.add_argument("--parts-fraction", type=float, default=0.5)
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--no-eval", action="store_true")
    args = parse_args(ap, argv)
    heldout, heldout_parts = task.make_heldout(), parts.make_heldout()
    meta_path = args.out / "sgl_merge_tiny_reasoner.json"

    def evaluate_all(model, segments, tok, meta) -> dict:
        slip = slip_rate(meta["uncertainty"], 0.7)
        model.eval()
        return {"chain": base.evaluate(args.out, heldout[: args.eval_problems], 4, 0.7),
                "parts": base.evaluate(args.out, heldout_parts[: args.eval_problems], 4, 0.7,
                                       is_correct=parts.is_correct),
                "summary_chain": evaluate_summary(model, segments, tok, heldout[: args.eval_problems],
                                                  task.is_correct, slip),
                "summary_parts": evaluate_summary(model, segments, tok, heldout_parts[: args.eval_problems],
                                                  parts.is_correct, slip)}

    if args.eval_only:
        model, tok, segments = load(args.out)
        evaluate_all(model, segments, tok, json.loads(meta_path.read_text()))
        return 0
    if args.base is None:
        ap.error("--base is required: the plain tiny reasoner to start from (see the usage above)")
    base_meta = json.loads((args.base / "sgl_merge_tiny_reasoner.json").read_text())
    model, tok, segments = load(args.base)
    if segments is not None:
        ap.error(f"{args.base} is already a ParaThinker (config.json has max_segments): start from the plain "
                 "tiny reasoner, e.g. python scripts/train_tiny_reasoner.py --out /tmp/base")
    torch.manual_seed(args.seed)
    segments = add_layout(model, tok)
    exclude = {p["question"] for p in heldout + heldout_parts}
    plain = base.Batches(tok, args.seed + 2, args.plain_batch, exclude, args.parts_fraction)
    slip = slip_rate(base_meta["uncertainty"], 0.7)
    para = ParaBatches(tok, args.seed, args.para_batch, exclude, args.parts_fraction, slip)
    print(f"vocab {len(tok)}  slip {slip:.4f}  example:\n{tok.decode(para.draw(2)[2]['ids'])}", flush=True)

    def losses(step):
        ids, attn, target, soft = plain.next()
        loss_plain = base.loss_fn(model(input_ids=ids, attention_mask=attn).logits, ids, target, soft,
                                  plain.digit_ids, base_meta["uncertainty"])
        ids, labels, mask, pos, seg, target, soft = para.next()
        segments.ids = seg
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        segments.ids = None
        loss_para = base.loss_fn(logits, ids, target, soft, plain.digit_ids, base_meta["uncertainty"], labels)
        return (loss_plain + loss_para) / 2, {"plain": loss_plain, "parathink": loss_para}

    steps, train_minutes, running = train(model, args, losses)
    meta = {**{k: v for k, v in base_meta.items() if k != "eval"}, "base_eval": base_meta.get("eval"),
            "parathinker": {"seed": args.seed, "steps": steps, "plain_batch": args.plain_batch,
                            "para_batch": args.para_batch, "lr": args.lr, "paths": [2, PATHS],
                            "slip": round(slip, 4), "train_minutes": round(train_minutes, 1),
                            "final_loss": {name: round(value, 4) for name, value in running.items()}}}
    base.save(model, tok, args.out, meta, [THINK_OPEN, THINK_CLOSE, *CONTROLS])
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)
    if not args.no_eval:
        meta["eval"] = evaluate_all(model, segments, tok, meta)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the tiny reasoning model bundled for the ThinkMerge demo (`sgl_merge/tiny_reasoner/`).

The model is a small Qwen2 causal LM with its own byte-level BPE tokenizer (the same recipe and
special tokens as `sgl_merge.tiny_models.build_tiny_model`), trained from scratch on the chained
modular arithmetic tasks of `sgl_merge.tiny_reasoner`: one chain answered as a digit (`task`) and
four short chains answered together as one line (`parts`), mixed in each batch
(`--parts-fraction`), loss on the assistant turn only.

Calibration. The demo needs a model whose single sampled trace (temperature 0.7) is right only
part of the time, with errors that are independent from trace to trace, so that voting over
parallel traces, or merging them, clearly helps. Under-training gives systematic errors (the same
wrong table entry every time), which voting cannot fix. So instead the model is trained to
convergence on everything except the result digit of each thinking line, where the target is
soft: the correct digit with probability 1 - u and each other digit with u / 9 (`--uncertainty`).
The model learns that distribution, so greedy decoding is almost always right while sampling at
temperature 0.7 makes a fresh, uniformly random slip with a small probability on every line;
over a 5-7 line chain those slips add up to the single-trace accuracy the demo wants, and since
every operation is a bijection mod 10, different slips give different wrong answers.

Reproducible from the seed: the data stream, the initialisation and the batch order all derive
from `--seed`; `--steps` fixes the run length (`--minutes` is only a safety cap).

    python scripts/train_tiny_reasoner.py                       # writes the shipped model
    python scripts/train_tiny_reasoner.py --out /tmp/tr --steps 500
    python scripts/train_tiny_reasoner.py --eval-only --out sgl_merge/tiny_reasoner/model
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _training import add_run_args, add_shape_args, parse_args, train
from sgl_merge.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN
from sgl_merge.tiny_reasoner import parts, task


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained on `corpus`, as `sgl_merge.tiny_models._build_tokenizer` does on its own.

    One difference: the pre-tokenizer is Qwen2's (digits one by one), not GPT-2's, because
    transformers loads any directory whose config says `qwen2` with `Qwen2Tokenizer`, which
    rebuilds the pre-tokenizer with that regex; merges learned across its boundaries (" 8")
    would silently never apply, and training would see other tokens than SGLang serves.
    The full byte alphabet keeps any text encodable; the few merges learned on task text make the
    question's words single tokens while digits and operators stay one token each.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_hf_tokenizer(vocab_size: int, seed: int):
    from transformers import PreTrainedTokenizerFast

    corpus = [task.training_text(p) for p in task.make_dataset(2000, seed + 7919)]
    corpus += [task.training_text(p) for p in task.make_dataset(1000, seed + 7919, parts.make_problem)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(corpus, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
        model_max_length=512,
    )
    # The model writes `<think>` itself, so the template does not open it.
    tok.chat_template = CHAT_TEMPLATE.replace("opens_think", "false")
    return tok


def reload_tokenizer(tok, model, out: Path):
    """Save tokenizer and config to `out` and load the tokenizer back as consumers will.

    Training then uses exactly the tokenization that transformers (and SGLang) apply to the
    shipped directory; a mismatch fails here rather than as a silently broken model.
    """
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.config.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    probe = [task.training_text(p) for make in (task.make_problem, parts.make_problem)
             for p in task.make_dataset(20, 12345, make)]
    for text in probe:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = loaded(text, add_special_tokens=False)["input_ids"]
        assert a == b, f"reloaded tokenizer differs:\n{a}\n{b}"
    return loaded


def build_model(tok, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * args.ffn_mult,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(config)


class Batches:
    """Deterministic stream of training batches, skipping every held-out question; each problem
    is of the parts task with probability `parts_fraction`, else of the chain task."""

    def __init__(self, tok, seed: int, batch_size: int, exclude: set[str], parts_fraction: float):
        self.tok = tok
        self.rng = random.Random(seed)
        self.batch_size = batch_size
        self.exclude = exclude
        self.parts_fraction = parts_fraction
        self.think_id = tok.convert_tokens_to_ids(THINK_OPEN)
        self.eq_id = tok.convert_tokens_to_ids("=")
        assert self.eq_id != tok.unk_token_id and self.eq_id is not None
        self.digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(task.MODULUS)]
        self.pad_id = tok.pad_token_id

    def next(self):
        problems = []
        while len(problems) < self.batch_size:
            make = parts.make_problem if self.rng.random() < self.parts_fraction else task.make_problem
            p = make(self.rng)
            if p["question"] not in self.exclude:
                problems.append(p)
        enc = [self.tok(task.training_text(p), add_special_tokens=False)["input_ids"]
               for p in problems]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        target = torch.zeros((len(enc), width), dtype=torch.bool)  # loss on this token
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            attn[i, : len(e)] = 1
            target[i, e.index(self.think_id): len(e)] = True
        prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)
        soft = target & (prev == self.eq_id)  # result digit of a thinking line
        return ids, attn, target, soft


def loss_fn(logits, ids, target, soft, digit_ids, uncertainty, labels=None):
    """Cross-entropy on assistant tokens; soft digit targets on each line's result digit. `labels`
    (default `ids`): the tokens to predict where they differ from the input (a slipped digit)."""
    logits = logits[:, :-1].float()
    labels = (ids if labels is None else labels)[:, 1:]
    tmask = target[:, 1:]
    smask = soft[:, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if uncertainty > 0:
        digits = torch.tensor(digit_ids)
        # Soft target: (1-u) on the correct digit, u/9 on each of the others.
        # -log p summed over the 9 wrong digits (all 10 digits minus the correct one; only
        # used where the label is a digit).
        other = -logp[..., digits].sum(-1) - nll
        k = len(digit_ids) - 1
        soft_nll = (1 - uncertainty) * nll + (uncertainty / k) * other
        nll = torch.where(smask, soft_nll, nll)
    return (nll * tmask).sum() / tmask.sum()


def finish_tokenizer_files(out: Path, tok, specials: list[str] = (THINK_OPEN, THINK_CLOSE)) -> None:
    """Also write the older layout, for loaders that read the chat template and special tokens
    from tokenizer_config.json / special_tokens_map.json rather than chat_template.jinja, and
    drop the load-time bookkeeping keys transformers writes back."""
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special = {"eos_token": tok.eos_token, "pad_token": tok.pad_token,
               "unk_token": tok.unk_token, "additional_special_tokens": list(specials)}
    special = {k: v for k, v in special.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def save(model, tok, out: Path, meta: dict, specials: list[str] = (THINK_OPEN, THINK_CLOSE)) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.config.use_cache = True
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.top_p = 1.0
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    finish_tokenizer_files(out, tok, specials)
    model_cfg_path = out / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text())
    model_cfg["torch_dtype"] = "float32"
    model_cfg_path.write_text(json.dumps(model_cfg, indent=2, sort_keys=True) + "\n")
    (out / "sgl_merge_tiny_reasoner.json").write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def evaluate(model_dir: Path, problems: list[dict], samples: int, temperature: float,
             is_correct=task.is_correct, max_new_tokens: int = 160, batch: int = 200, log=print) -> dict:
    """Single-trace accuracy, majority vote over `samples` traces (whole answers), and greedy
    accuracy, scored by `is_correct` (the task's)."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    think_close = tok.convert_tokens_to_ids(THINK_CLOSE)

    def gen(prompts, do_sample):
        outs, ntoks = [], []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            kw = {"do_sample": False}
            if do_sample:
                kw = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **kw)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                n = row.index(think_close) + 1 if think_close in row else len(row)
                ntoks.append(n)
            outs += tok.batch_decode(new, skip_special_tokens=False)
        return outs, ntoks

    prompts = [tok.apply_chat_template(task.prompt_messages(p["question"]), tokenize=False,
                                       add_generation_prompt=True) for p in problems]
    t0 = time.time()
    torch.manual_seed(0)  # the sampled traces, so a report can be reproduced
    greedy, _ = gen(prompts, False)
    greedy_acc = sum(is_correct(t, p["answer"]) for t, p in zip(greedy, problems)) / len(problems)
    sampled, ntoks = gen([q for q in prompts for _ in range(samples)], True)
    single = vote = 0
    for i, p in enumerate(problems):
        texts = sampled[i * samples: (i + 1) * samples]
        single += sum(is_correct(t, p["answer"]) for t in texts)
        answers = [task.extract_answer(t) for t in texts]
        counts = collections.Counter(a for a in answers if a is not None)
        if counts:
            # Plurality; ties broken by first occurrence (order of the traces).
            best = max(counts.values())
            top = next(a for a in answers if a is not None and counts[a] == best)
            vote += is_correct(f"\\boxed{{{top}}}", p["answer"])
    res = {
        "problems": len(problems),
        "samples": samples,
        "temperature": temperature,
        "greedy_acc": greedy_acc,
        "single_trace_acc": single / (len(problems) * samples),
        f"vote@{samples}_acc": vote / len(problems),
        "mean_thinking_tokens": sum(ntoks) / len(ntoks),
        "eval_seconds": round(time.time() - t0, 1),
    }
    log(json.dumps(res))
    log("example sample:\n" + sampled[0])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=task.MODEL_DIR)
    ap.add_argument("--heldout-out", type=Path, default=None,
                    help="where to write the chain task's held-out set, the parts task's beside it "
                         "(default: next to the tasks, only when --out is the shipped model directory)")
    add_run_args(ap, steps=1000, minutes=28.0, lr=3e-3, warmup=100, log_every=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--uncertainty", type=float, default=0.25,
                    help="probability mass the result-digit targets spread over wrong digits")
    ap.add_argument("--parts-fraction", type=float, default=0.5,
                    help="share of training problems from the parts task (the rest: the chain task)")
    add_shape_args(ap, vocab_size=320)
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--no-eval", action="store_true")
    args = parse_args(ap, argv)

    heldout = task.make_heldout()
    heldout_parts = parts.make_heldout()

    def evaluate_both() -> dict:
        return {"chain": evaluate(args.out, heldout[: args.eval_problems], args.eval_samples, 0.7),
                "parts": evaluate(args.out, heldout_parts[: args.eval_problems], args.eval_samples, 0.7,
                                  is_correct=parts.is_correct)}

    if args.eval_only:
        evaluate_both()
        return 0

    random.seed(args.seed)
    tok = build_hf_tokenizer(args.vocab_size, args.seed)
    model = build_model(tok, args)
    tok = reload_tokenizer(tok, model, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {n_params / 1e6:.3f}M  config {args.hidden}x{args.layers} "
          f"heads {args.heads}/{args.kv_heads}", flush=True)
    sample = task.make_problem(random.Random(1))
    print("tokens:", tok.convert_ids_to_tokens(tok(task.training_text(sample))["input_ids"]), flush=True)

    batches = Batches(tok, args.seed, args.batch_size, {p["question"] for p in heldout + heldout_parts},
                      args.parts_fraction)

    def losses(step):
        ids, attn, target, soft = batches.next()
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss = loss_fn(logits, ids, target, soft, batches.digit_ids, args.uncertainty)
        return loss, {"loss": loss}

    steps, train_minutes, running = train(model, args, losses)
    meta = {
        "seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "uncertainty": args.uncertainty, "train_minutes": round(train_minutes, 1),
        "final_loss": round(running["loss"], 4), "parts_fraction": args.parts_fraction,
        "tasks": ["sgl_merge.tiny_reasoner.task", "sgl_merge.tiny_reasoner.parts"],
    }
    save(model, tok, args.out, meta)
    heldout_out = args.heldout_out
    if heldout_out is None and args.out.resolve() == task.MODEL_DIR.resolve():
        heldout_out = task.HELDOUT
    if heldout_out is not None:
        for rows, path in ((heldout, heldout_out), (heldout_parts, heldout_out.with_name(parts.HELDOUT.name))):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.writelines(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n" for p in rows)
            print(f"wrote {len(rows)} held-out problems to {path}")
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)
    if not args.no_eval:
        meta["eval"] = evaluate_both()
        (args.out / "sgl_merge_tiny_reasoner.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

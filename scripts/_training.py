"""What the tiny models' training scripts share (train_tiny_reasoner, train_tiny_parathinker,
train_tiny_researcher): their run and model-shape options, and the training loop itself (AdamW,
linear warm-up then cosine decay to 5%, gradient clipping, running losses logged, a time cap), so
the three differ only in their data and their losses."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch


def add_run_args(ap: argparse.ArgumentParser, *, steps: int, minutes: float, lr: float, warmup: int,
                 log_every: int) -> None:
    """--steps (the run's length), --minutes (only a safety cap), --lr, --warmup, --threads, --log-every,
    --eval-only, with the script's defaults."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--minutes", type=float, default=minutes, help="stop early after this long")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=log_every)
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the saved model")


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The script's arguments, with `--threads` applied to torch."""
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def add_shape_args(ap: argparse.ArgumentParser, *, vocab_size: int) -> None:
    """The model's shape: a small Qwen2 (128 wide, 4 layers, 4 heads, 2 KV heads, FFN 2x wide)."""
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn-mult", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=vocab_size)


def train(model: torch.nn.Module, args: argparse.Namespace,
          losses: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[int, float, dict[str, float]]:
    """Train for `args.steps` steps (or until `args.minutes`): `losses(step)` gives the loss to
    minimise and the named losses to log (as running averages). Returns (steps run, minutes, the
    final running losses)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    model.train()
    t0, running, step = time.time(), {}, 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, logged = losses(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for name, value in logged.items():
            value = value.item()
            running[name] = value if name not in running else 0.95 * running[name] + 0.05 * value
        elapsed = time.time() - t0
        if step % args.log_every == 0 or step == args.steps - 1:
            shown = "  ".join(f"{name} {value:.4f}" for name, value in running.items())
            print(f"step {step:5d}/{args.steps}  {shown}  lr {lr_at(step):.2e}  {elapsed / 60:.1f} min", flush=True)
        if elapsed > args.minutes * 60:
            print(f"time cap of {args.minutes} min reached at step {step}", flush=True)
            break
    minutes = (time.time() - t0) / 60
    print(f"trained {step + 1} steps in {minutes:.1f} min", flush=True)
    model.eval()
    return step + 1, minutes, running

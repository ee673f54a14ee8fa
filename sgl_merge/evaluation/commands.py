"""`sgl-merge demo` and `sgl-merge eval`: start or reach a server, evaluate, report.

Both write into one output folder: `results.jsonl` (one line per problem run, appended as it
finishes, which is what resuming reads), `config.json` (the settings the results were made with;
a resume with other settings is refused), `summary.json` (the table as data) and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import requests

from sgl_merge.evaluation import report, runner
from sgl_merge.evaluation.options import check_config, interrupted, parse_ks
from sgl_merge.evaluation.runner import EvalConfig, EvalError
from sgl_merge.evaluation.scoring import TASKS
from sgl_merge.contract.merge import MODES
from sgl_merge.server import running

DEMO_DESCRIPTION = """\
The main job on the embedded default: start the CPU server with the bundled tiny reasoner and run
its two held-out tasks: "chain" (one chain of mod-10 arithmetic, a one-digit answer) and "parts"
(four short chains answered together as one line, scored whole). On each, a single trace, majority
vote@k and ThinkMerge@k (uniform, confidence-weighted, and over the most confident half) for k in
2, 4, 8, all reading the same 8 thinking traces per problem, and parathink@k (the bundled model is
also a tiny ParaThinker: 8 numbered paths per problem, one summary joined over the first k); print
accuracy with 95% confidence intervals, paired differences and tokens used, write results and a
plot per task, stop the server."""

EVAL_DESCRIPTION = """\
Evaluate single trace, majority vote@k and ThinkMerge@k on your server, model and data.
Math problems are JSONL lines with "question" and "answer" (checked with math-verify on the last
\\boxed{} of the answer); exact problems too (the last boxed text must equal the answer, spaces
ignored: for answers of several parts); code problems have "problem" and "tests" (Python asserts,
run in a sandboxed subprocess). Results are appended per problem: rerun the same command to resume."""


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in runner.METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"--methods takes a list of {list(runner.METHODS)}, got {text!r}")
    return methods


def _add_common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--url", help="an existing server started with sgl-merge serve (else one is started)")
    p.add_argument("--api-key", help="the --api-key the --url server was started with, sent with every request")
    p.add_argument("--model-path", help="start a server with this model instead (with --device cpu on CPU)")
    p.add_argument("--k", type=parse_ks, default=(2, 4, 8), help="values of k, comma-separated (default 2,4,8)")
    p.add_argument("--concurrency", type=int, default=32, help="problems in flight at once (default 32)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")


def _evaluate(url: str, problems: list[dict], cfg: EvalConfig, out: Path, title: str,
              api_key: str | None = None) -> dict:
    start = time.monotonic()
    records = runner.run(url, problems, cfg, out / "results.jsonl", api_key=api_key)
    summary = report.summarize(records, list(cfg.ks))
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report.plot(summary, out / "accuracy.png", title)
    print()
    print(report.format_table(summary))
    print(f"\nresults: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}\nplot:    {out / 'accuracy.png'}")
    return summary


def _weightings(text: str) -> tuple[str, ...]:
    values = tuple(w.strip() for w in text.split(",") if w.strip())
    bad = [w for w in values if w not in runner.WEIGHTINGS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"--weighting takes a list of {list(runner.WEIGHTINGS)}, got {text!r}")
    return values


def demo(argv: list[str]) -> int:
    from sgl_merge.tiny_reasoner import HELDOUT, MODEL_DIR, parts

    p = argparse.ArgumentParser(prog="sgl-merge demo", description=DEMO_DESCRIPTION)
    _add_common(p, "sgl-merge-demo")
    p.add_argument("--problems", type=int, default=None,
                   help="held-out problems per task (default 100 of the 300 chain ones and 70 of the 200 parts "
                        "ones, which keeps the demo near 4 minutes on a 2-core CPU)")
    p.add_argument("--tasks", default="chain,parts",
                   help="which of chain,parts,research to run (default chain,parts); research: the tiny research "
                        "model's agent on 2-3 hop questions over the bundled corpus, single vs vote@k vs merge@k "
                        "(its own server, about 3 minutes)")
    args = p.parse_args(argv)
    args.model_path = args.model_path or MODEL_DIR
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"chain", "parts", "research"}:
        p.error(f"--tasks takes chain, parts, research or several, got {args.tasks!r}")
    if "research" in tasks and len(tasks) > 1 and args.url:
        p.error("research runs another model than chain and parts: give --url for --tasks research alone")
    research = "research" in tasks
    tasks = [t for t in tasks if t != "research"]
    # The bundled model: the question alone is its prompt; traces are ~50 (chain) and ~110 (parts)
    # tokens, answers a handful; answers greedy, as for every method.
    common = dict(ks=args.k, prompt="{question}", thinking_temperature=0.7, answer_temperature=0.0,
                  weightings=tuple(runner.WEIGHTINGS), concurrency=args.concurrency)
    setups = {"chain": (HELDOUT, 100, EvalConfig(task="math", thinking_budget=128, answer_tokens=16, **common)),
              "parts": (parts.HELDOUT, 70, EvalConfig(task="exact", thinking_budget=192, answer_tokens=24, **common))}
    start = time.monotonic()
    try:
        for name in tasks:
            dataset, _, cfg = setups[name]
            check_config(args.out / name, asdict(cfg), str(dataset))
        # parathink@8 reads 8 paths' KV at once: more tokens than the model's 512 positions, while its
        # own positions stay within prompt + the longest path ("after_longest"). So the server takes
        # 4096 tokens of context; no method uses a position past 512.
        flags = ["--dtype", "float32", "--max-total-tokens", "100000", "--max-running-requests", "512",
                 "--context-length", "4096"]
        with (running(args.url, args.model_path, flags, env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"})
              if tasks else contextlib.nullcontext()) as url:
            for name in tasks:
                dataset, default_limit, cfg = setups[name]
                problems = runner.load_problems(dataset, cfg.task, limit=args.problems or default_limit)
                print(f"\n== task {name}: {len(problems)} problems ({dataset.name}) ==")
                _evaluate(url, problems, cfg, args.out / name, f"sgl-merge demo: tiny reasoner, {name}",
                          api_key=args.api_key if args.url else None)
        if research:
            from sgl_merge.research import evaluate as research_eval

            research_eval.demo(args.url, args.out / "research", ks=args.k, problems=args.problems or 40,
                               concurrency=min(args.concurrency, 8), api_key=args.api_key if args.url else None)
    except (EvalError, RuntimeError, requests.RequestException) as e:
        print(f"sgl-merge demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted("sgl-merge demo", args.out)
    print(f"\nsgl-merge demo done in {time.monotonic() - start:.0f} s")
    return 0


def evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sgl-merge eval", description=EVAL_DESCRIPTION)
    _add_common(p, "sgl-merge-eval")
    p.add_argument("--dataset", required=True, help="JSONL file of problems")
    p.add_argument("--task", choices=TASKS, default="math",
                   help="math: boxed answers checked with math-verify; exact: the boxed text must equal the "
                        "answer; code: answers run against tests")
    p.add_argument("--methods", type=_methods, default=runner.METHODS, help="any of single,vote,merge,parathink (default all)")
    p.add_argument("--samples", type=int, default=1, help="independent runs per problem (default 1)")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--prompt", help="prompt template over the problem's fields, e.g. '{question}' "
                                    "(default: a step-by-step / one python block instruction)")
    p.add_argument("--thinking-budget", type=int, default=2048, help="max tokens per trace (default 2048)")
    p.add_argument("--thinking-temperature", type=float, default=0.7, help="(default 0.7)")
    p.add_argument("--answer-tokens", type=int, default=256, help="max answer tokens (default 256)")
    p.add_argument("--answer-temperature", type=float, default=0.0,
                   help="for every method's answer (default 0: greedy)")
    p.add_argument("--mode", choices=MODES, default="logits",
                   help="how merge@k averages the k rows (default logits)")
    p.add_argument("--weighting", type=_weightings, default=("uniform",),
                   help="merge rows to run, comma-separated: uniform (merge@k), confidence (merge-conf@k: "
                        "members weighted by their trace's DeepConf confidence), adaptive (merge-keep@k: "
                        "only the most confident traces); default uniform")
    p.add_argument("--keep-fraction", type=float, default=0.5,
                   help="share of the k traces merge-keep@k keeps, rounded up (default 0.5)")
    args = p.parse_args(argv)
    if not args.url and not args.model_path:
        p.error("give --url of a running sgl-merge server, or --model-path to start one")
    if not 0 < args.keep_fraction <= 1:
        p.error(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
    cfg = EvalConfig(task=args.task, methods=args.methods, ks=args.k, samples=args.samples, prompt=args.prompt,
                     thinking_budget=args.thinking_budget, thinking_temperature=args.thinking_temperature,
                     answer_tokens=args.answer_tokens, answer_temperature=args.answer_temperature,
                     mode=args.mode, weightings=args.weighting, keep_fraction=args.keep_fraction,
                     concurrency=args.concurrency)
    try:
        problems = runner.load_problems(args.dataset, args.task, limit=args.limit)
        check_config(args.out, asdict(cfg), str(Path(args.dataset).resolve()))
        with running(args.url, args.model_path) as url:
            _evaluate(url, problems, cfg, args.out, f"sgl-merge eval: {Path(args.dataset).name}",
                      api_key=args.api_key if args.url else None)
    except (EvalError, RuntimeError, OSError, requests.RequestException) as e:
        print(f"sgl-merge eval: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted("sgl-merge eval", args.out)
    return 0

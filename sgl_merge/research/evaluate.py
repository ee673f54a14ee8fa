"""`sgl-merge eval --task research`: single agent vs vote@k vs merge@k over a fixed corpus.

Per problem: max(k) independent single agents (K = 1 each; "single" is their mean accuracy, vote@k
the plurality of the first k agents' final answers, ties to the earliest) and, for each k, one
merged agent (k branches per step, merged tool calls and answer). Answers are checked by exact
match after normalising case, punctuation and a leading "the" (`synthetic.normalize_answer`).
Records have the shape of the other tasks' (`evaluation.report` makes the table and plot), plus each
agent's steps, tool calls and prefilled tokens; rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from sgl_merge.evaluation import report
from sgl_merge.evaluation.options import check_config, interrupted, parse_ks
from sgl_merge.evaluation.runner import EvalError, append_results, done_keys, load_problems
from sgl_merge.frontend.merge import MergeError, ServerClient, majority
from sgl_merge.research.agent import SYSTEM_PROMPT, AgentConfig, ResearchAgent, Trace
from sgl_merge.research.command import add_index_cache_args, build_toolset, index_cache
from sgl_merge.research.synthetic import CORPUS, HELDOUT, is_correct, normalize_answer
from sgl_merge.research.tools import ToolConfigError
from sgl_merge.server import running

DESCRIPTION = """\
Evaluate the research agent on questions over a fixed corpus: a single agent, majority vote@k over
k independent agents' final answers, and merge@k (k branches per step, every tool call and the
answer merged). Questions are JSONL lines with "question" and "answer" (exact match after
normalising case and punctuation); the corpus is JSONL with docid, title/url and text
(BrowseComp-Plus's layout), searched with BM25 and read with visit. Prints accuracy with 95% CIs,
paired differences, tokens, tool calls and prefilled tokens per problem; results are appended per
problem: rerun the same command to resume."""


@dataclass(frozen=True)
class ResearchEvalConfig:
    ks: tuple[int, ...] = (2, 4, 8)
    methods: tuple[str, ...] = ("single", "vote", "merge")
    max_steps: int = 6
    think_tokens: int = 256
    call_tokens: int = 128
    answer_tokens: int = 64
    temperature: float = 0.7
    mode: str = "logits"
    top_k: int = 5
    page_chars: int = 2000
    visit: bool = True
    system_prompt: str = SYSTEM_PROMPT
    concurrency: int = 8

    def toolset(self, corpus: str | Path, index_cache: Path | None = None):
        """Search over `corpus` (and visit its pages, unless `visit` is off), as configured; the
        corpus's index kept in `index_cache` where given."""
        return build_toolset("local", corpus=str(corpus), visit=self.visit, top_k=self.top_k,
                             page_chars=self.page_chars, index_cache=index_cache)

    def agent(self, k: int) -> AgentConfig:
        return AgentConfig(k=k, max_steps=self.max_steps, think_tokens=self.think_tokens,
                           call_tokens=self.call_tokens, answer_tokens=self.answer_tokens,
                           temperature=self.temperature, mode=self.mode, system_prompt=self.system_prompt)


def _outcome(trace: Trace, problem: dict) -> dict:
    """An agent's result; its tokens count every branch's (each of the K members decodes every merged
    token, as in the other tasks' merge@k)."""
    totals = trace.totals()
    return {"answer": trace.answer, "correct": trace.answer is not None and is_correct(trace.answer, problem),
            "tokens": totals["decision_tokens"], "thinking_tokens": totals["thinking_tokens"],
            "total_tokens": totals["thinking_tokens"] + trace.k * totals["decision_tokens"], "steps": totals["steps"],
            "tool_calls": totals["tool_calls"], "prefilled_tokens": totals["prefilled_tokens"]}


def solve(server: ServerClient, toolset, cfg: ResearchEvalConfig, problem: dict) -> dict:
    """One problem: the record `evaluation.report` reads (answers / thinking_tokens / vote / merge)."""
    record: dict = {}
    if "single" in cfg.methods or "vote" in cfg.methods:
        n = max(cfg.ks) if "vote" in cfg.methods else 1
        single = ResearchAgent(server, toolset, cfg.agent(1))
        singles = [_outcome(single.run(problem["question"]), problem) for _ in range(n)]
        record["answers"] = singles
        record["thinking_tokens"] = [s["thinking_tokens"] for s in singles]
        if "vote" in cfg.methods:
            keys = [normalize_answer(s["answer"]) if s["answer"] else None for s in singles]
            record["vote"] = {}
            for k in cfg.ks:
                winner, counts = majority(keys[:k])
                record["vote"][str(k)] = {"correct": winner is not None and singles[winner]["correct"],
                                          "answer": None if winner is None else singles[winner]["answer"]}
    if "merge" in cfg.methods:
        record["merge"] = {str(k): _outcome(ResearchAgent(server, toolset, cfg.agent(k)).run(problem["question"]),
                                            problem) for k in cfg.ks}
    return record


def evaluate_research(url: str, problems: list[dict], toolset, cfg: ResearchEvalConfig, out: Path, title: str,
                      api_key: str | None = None, progress: bool = True) -> dict:
    """Evaluate every problem not yet in `out/results.jsonl`, then summarise all of them."""
    server = ServerClient(url.rstrip("/"), api_key)
    results = out / "results.jsonl"
    done = done_keys(results)
    todo = [(i, 0) for i in range(len(problems)) if (i, 0) not in done]
    start = time.monotonic()
    records = append_results(results, todo, lambda i: solve(server, toolset, cfg, problems[i]), cfg.concurrency,
                             f"resuming: {len(done)} problems already in {results}" if done and progress else None,
                             progress)
    summary = report.summarize(records, list(cfg.ks))
    summary["agents"] = agent_table(records, cfg)
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report.plot(summary, out / "accuracy.png", title)
    print()
    print(report.format_table(summary))
    print()
    print(format_agent_table(summary["agents"]))
    print(f"\nresults: {results}\nsummary: {out / 'summary.json'}\nplot:    {out / 'accuracy.png'}")
    return summary


AGENT_COLUMNS = ("steps", "tool_calls", "total_tokens", "prefilled_tokens")


def agent_table(records: list[dict], cfg: ResearchEvalConfig) -> list[dict]:
    """Per method: mean steps, tool calls, generated and prefilled tokens per problem."""
    def row(name: str, per_problem) -> dict:
        """`per_problem(record, column)`: the method's figure on one problem."""
        return {"name": name, **{c: sum(per_problem(r, c) for r in records) / len(records) for c in AGENT_COLUMNS}}

    rows = []
    if records and "answers" in records[0]:  # a problem's single figure: the mean of its agents'
        rows.append(row("single", lambda r, c: sum(a[c] for a in r["answers"]) / len(r["answers"])))
    for k in cfg.ks:
        if records and "vote" in records[0]:
            rows.append(row(f"vote@{k}", lambda r, c, k=k: sum(a[c] for a in r["answers"][:k])))
        if records and "merge" in records[0]:
            rows.append(row(f"merge@{k}", lambda r, c, k=k: r["merge"][str(k)][c]))
    return rows


def format_agent_table(rows: list[dict]) -> str:
    lines = [f"{'method':<12} {'steps':>7} {'tool calls':>11} {'tokens':>9} {'prefilled':>10}   (per problem; "
             "vote@k: its k agents together)"]
    for r in rows:
        lines.append(f"{r['name']:<12} {r['steps']:>7.2f} {r['tool_calls']:>11.2f} {r['total_tokens']:>9.0f} "
                     f"{r['prefilled_tokens']:>10.0f}")
    return "\n".join(lines)


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods or set(methods) - {"single", "vote", "merge"}:
        raise argparse.ArgumentTypeError(f"--methods takes a list of single,vote,merge, got {text!r}")
    return methods


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sgl-merge eval --task research", description=DESCRIPTION)
    p.add_argument("--task", choices=["research"], required=True)
    p.add_argument("--dataset", required=True, help="JSONL questions: question, answer")
    p.add_argument("--corpus", required=True, help="JSONL corpus: docid, title/url, text")
    add_index_cache_args(p)
    p.add_argument("--url", help="an existing server started with sgl-merge serve (else one is started)")
    p.add_argument("--api-key", help="the --api-key the --url server was started with")
    p.add_argument("--model-path", help="start a server with this model instead")
    p.add_argument("--k", type=parse_ks, default=(2, 4, 8), help="values of k, comma-separated (default 2,4,8)")
    p.add_argument("--methods", type=_methods, default=("single", "vote", "merge"),
                   help="any of single,vote,merge (default all)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--max-steps", type=int, default=6, help="tool calls before an agent must answer (default 6)")
    p.add_argument("--think-tokens", type=int, default=256, help="thinking budget per branch per step (default 256)")
    p.add_argument("--answer-tokens", type=int, default=64, help="(default 64)")
    p.add_argument("--temperature", type=float, default=0.7, help="thinking and decisions (default 0.7)")
    p.add_argument("--top-k", type=int, default=5, help="search results per query (default 5)")
    p.add_argument("--page-chars", type=int, default=2000, help="characters of a visited page shown (default 2000)")
    p.add_argument("--no-visit", action="store_true", help="search only")
    p.add_argument("--system-prompt", type=Path, help="a file with the system prompt ({tools}, {date} filled in)")
    p.add_argument("--concurrency", type=int, default=8, help="problems in flight at once (default 8)")
    p.add_argument("--out", type=Path, default=Path("sgl-merge-eval-research"), help="output folder")
    args = p.parse_args(argv)
    if not args.url and not args.model_path:
        p.error("give --url of a running sgl-merge server, or --model-path to start one")
    cfg = ResearchEvalConfig(ks=args.k, methods=args.methods, max_steps=args.max_steps,
                             think_tokens=args.think_tokens, answer_tokens=args.answer_tokens,
                             temperature=args.temperature, top_k=args.top_k, page_chars=args.page_chars,
                             visit=not args.no_visit, concurrency=args.concurrency,
                             system_prompt=args.system_prompt.read_text() if args.system_prompt else SYSTEM_PROMPT)
    try:
        problems = load_problems(args.dataset, "research", limit=args.limit)
        toolset = cfg.toolset(args.corpus, index_cache(args))
        check_config(args.out, asdict(cfg) | {"corpus": str(Path(args.corpus).resolve())},
                     str(Path(args.dataset).resolve()))
        with running(args.url, args.model_path) as url:
            evaluate_research(url, problems, toolset, cfg, args.out,
                              f"sgl-merge eval: research, {Path(args.dataset).name}",
                              api_key=args.api_key if args.url else None)
    except (EvalError, ToolConfigError, MergeError, RuntimeError, OSError, requests.RequestException) as e:
        print(f"sgl-merge eval: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted("sgl-merge eval", args.out)
    return 0


# ------------------------------------------------------------------ the demo's research task

RESEARCHER = Path(__file__).resolve().parent / "model"  # the tiny research model (scripts/train_tiny_researcher.py)
# Its server: fp32 as trained; room for every agent of the concurrent problems at once.
RESEARCHER_FLAGS = ["--dtype", "float32", "--max-total-tokens", "100000", "--max-running-requests", "512",
                    "--constrained-json-disable-any-whitespace"]


def researcher_config(ks: tuple[int, ...], concurrency: int) -> ResearchEvalConfig:
    """The settings the tiny research model was trained for: its own short system prompt, search only
    (top 2 results; the facts are in the snippets), short thoughts."""
    return ResearchEvalConfig(ks=ks, max_steps=5, think_tokens=24, call_tokens=48, answer_tokens=16,
                              temperature=0.7, top_k=2, visit=False, concurrency=concurrency,
                              system_prompt=(RESEARCHER / "system_prompt.txt").read_text())


def demo(url: str | None, out: Path, *, ks: tuple[int, ...], problems: int, concurrency: int,
         api_key: str | None = None) -> dict:
    """`sgl-merge demo --tasks research`: the tiny research model on the bundled synthetic task."""
    cfg = researcher_config(ks, concurrency)
    toolset = cfg.toolset(CORPUS)
    check_config(out, asdict(cfg), str(HELDOUT))
    questions = load_problems(HELDOUT, "research", limit=problems)
    print(f"\n== task research: {len(questions)} problems ({HELDOUT.name}, the tiny research model) ==")
    with running(url, str(RESEARCHER), RESEARCHER_FLAGS) as server_url:
        return evaluate_research(server_url, questions, toolset, cfg, out,
                                 "sgl-merge demo: tiny research model, 2-3 hop questions", api_key=api_key)

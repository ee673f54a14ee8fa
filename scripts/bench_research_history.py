"""Benchmark the research agent's shared history: prompt tokens prefilled vs served by the cache.

With `history="shared"` a step's thinking leaves the context once its tool call is merged, so the K
branches share one history and each tool response is prefilled once; with `history="own"` each
branch keeps its own thinking, and every response is prefilled K times (once per branch). For K in
--ks, both are run side by side on the same questions (the bundled synthetic corpus's held-out
questions) with the same fixed number of tool calls per question, and per step the prompt tokens
prefilled and served from the cache are printed, then the own/shared ratio of prefilled tokens
after the first step (where the histories differ).

The tool is `page`: whatever its (short) arguments, it answers with --page-chars characters of the
synthetic corpus's pages, so every response has the same size on any model (a random one included).

    python scripts/bench_research_history.py                      # local CPU server, small random model
    python scripts/bench_research_history.py --url http://127.0.0.1:30000 --ks 4,8 --questions 8
"""

from __future__ import annotations

import statistics

from _common import SMALL_RANDOM_MODEL, parser

from sgl_merge.research.agent import AgentConfig, ResearchAgent
from sgl_merge.research.synthetic import load_corpus, load_questions
from sgl_merge.research.tools import Observation, Tool, Toolset

SYSTEM = "Research the question with the tools, then answer.\n<tools>\n{tools}\n</tools>\nDate: {date}"


class PageTool(Tool):
    """Fixed-size responses: --page-chars characters of corpus pages, starting at a page chosen by
    the call's arguments."""

    name = "page"
    description = "Read a page about a name."
    parameters = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}

    def __init__(self, chars: int):
        self.text = " ".join(page["text"] for page in load_corpus())
        self.chars = chars

    def run(self, arguments: dict) -> Observation:
        start = sum(map(ord, str(arguments))) * 97 % (len(self.text) - self.chars)
        return Observation(self.text[start:start + self.chars])


def run(url: str, k: int, history: str, questions: list[str], steps: int, chars: int) -> list[list[int]]:
    """Per question, per step: (prefilled, cached) prompt tokens."""
    cfg = AgentConfig(k=k, max_steps=steps + 1, min_calls=steps, think_tokens=32, call_tokens=48,
                      answer_tokens=8, temperature=0.8, seed=1, history=history, system_prompt=SYSTEM)
    agent = ResearchAgent(url, Toolset([PageTool(chars)]), cfg)
    return [[(s.prefilled_tokens, s.cached_tokens) for s in agent.run(q).steps] for q in questions]


def main() -> None:
    p = parser(__doc__, SMALL_RANDOM_MODEL, rounds=None)
    p.add_argument("--ks", default="4,8", help="branch counts, comma-separated (default 4,8)")
    p.add_argument("--questions", type=int, default=4, help="questions per setting (default 4)")
    p.add_argument("--steps", type=int, default=3, help="tool calls per question before the answer (default 3)")
    p.add_argument("--page-chars", type=int, default=600, help="characters per tool response (default 600)")
    args = p.parse_args()
    from sgl_merge.server import running

    questions = [q["question"] for q in load_questions()[:args.questions]]
    with running(args.url, args.model_path) as url:
        for k in (int(x) for x in args.ks.split(",")):
            totals = {}
            for history in ("shared", "own"):
                steps = run(url, k, history, questions, args.steps, args.page_chars)
                totals[history] = sum(pre for q in steps for pre, _ in q[1:])
                print(f"\nK={k}, history={history}: prompt tokens per step, prefilled / from cache "
                      f"(mean over {len(questions)} questions)")
                for i in range(args.steps + 1):
                    pre = statistics.mean(q[i][0] for q in steps)
                    cached = statistics.mean(q[i][1] for q in steps)
                    print(f"    step {i + 1}: {pre:8.0f} prefilled  {cached:8.0f} from cache")
            print(f"K={k}: prefilled after step 1, own/shared = {totals['own']} / {totals['shared']} = "
                  f"{totals['own'] / totals['shared']:.2f}")


if __name__ == "__main__":
    main()

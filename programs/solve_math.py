"""Competition-style maths with a boxed final answer: single trace, majority vote and ThinkMerge
side by side on a JSONL file of {"question", "answer"}; prints accuracy and tokens per method.

    python programs/solve_math.py --url http://127.0.0.1:30000 --k 4 --data problems.jsonl
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root (and `programs`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sglang as sgl  # noqa: E402

from programs._common import answer_tokens, load_jsonl, parser, print_table  # noqa: E402
from sgl_merge import think_merge, vote  # noqa: E402

PROMPT = ("Question: {question}\nThink step by step inside <think></think>, then give the final answer "
          "as \\boxed{{...}}.\n<think>\n")


def extract_boxed(text: str | None) -> str | None:
    """The content of the last \\boxed{...} in `text` (nested braces allowed), stripped."""
    if not text:
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _think_then_answer(s, think_tokens, answer_tokens, temperature):
    s += sgl.gen("thinking", max_tokens=think_tokens, stop="</think>", temperature=temperature)
    s += "</think>\n"
    s += sgl.gen("answer", max_tokens=answer_tokens, temperature=temperature)


@sgl.function
def single(s, question, think_tokens=1024, answer_tokens=128, temperature=0.7):
    s += PROMPT.format(question=question)
    _think_then_answer(s, think_tokens, answer_tokens, temperature)


@sgl.function
def majority(s, question, k, think_tokens=1024, answer_tokens=128, temperature=0.7):
    s += PROMPT.format(question=question)
    forks = s.fork(k)
    for f in forks:
        _think_then_answer(f, think_tokens, answer_tokens, temperature)
    winner, counts = vote(forks, "answer", extract=extract_boxed)
    forks.join()
    s["answer"] = f"\\boxed{{{winner}}}" if winner is not None else ""
    s["counts"] = dict(counts)


@sgl.function
def merged(s, question, k, think_tokens=1024, answer_tokens=128, temperature=0.7):
    s += PROMPT.format(question=question)
    think_merge(s, k=k, thinking_budget=think_tokens, thinking_temperature=temperature,
                max_tokens=answer_tokens, temperature=temperature)


def evaluate(problems, url, k, **gen) -> dict[str, dict]:
    """Run the three methods on every problem; return per method the accuracy and answer tokens."""
    backend = sgl.RuntimeEndpoint(url)
    methods = {"single": (single, {}), f"vote@{k}": (majority, {"k": k}), f"merge@{k}": (merged, {"k": k})}
    results = {}
    for name, (program, extra) in methods.items():
        states = program.run_batch([{"question": p["question"], **extra, **gen} for p in problems],
                                   backend=backend, progress_bar=True)
        correct = [extract_boxed(st["answer"]) == str(p["answer"]).strip() for st, p in zip(states, problems)]
        results[name] = {"score": sum(correct) / max(len(problems), 1),
                         "tokens": sum(answer_tokens(st) for st in states)}
    return results


def main(argv=None):
    p = parser(__doc__, default_data="problems.jsonl")
    p.add_argument("--think-tokens", type=int, default=1024)
    args = p.parse_args(argv)
    results = evaluate(load_jsonl(args.data, args.limit), args.url, args.k, think_tokens=args.think_tokens)
    print_table(f"accuracy on {args.data}", results)
    return results


if __name__ == "__main__":
    main()

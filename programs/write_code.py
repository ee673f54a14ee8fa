"""Code generation where the answer is a program: single trace vs ThinkMerge, pass@1.

Each JSONL problem has "prompt" (what to write) and "tests" (Python code with asserts). The answer's
code (its ```python block, or the whole answer) runs against the tests in a separate Python process
with a time and a memory limit.

    python programs/write_code.py --url http://127.0.0.1:30000 --k 2 --data problems.jsonl
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root (and `programs`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sglang as sgl  # noqa: E402

from sgl_merge import think_merge  # noqa: E402
from sgl_merge.evaluation.sandbox import extract_code, run_tests  # noqa: E402
from programs._common import answer_tokens, load_jsonl, parser, print_table  # noqa: E402

PROMPT = "Write Python code for this task. Answer with one ```python block.\nTask: {prompt}\n<think>\n"


@sgl.function
def single(s, prompt, think_tokens=1024, answer_tokens=512, temperature=0.6):
    s += PROMPT.format(prompt=prompt)
    s += sgl.gen("thinking", max_tokens=think_tokens, stop="</think>", temperature=temperature)
    s += "</think>\n"
    s += sgl.gen("answer", max_tokens=answer_tokens, temperature=temperature)


@sgl.function
def merged(s, prompt, k, think_tokens=1024, answer_tokens=512, temperature=0.6):
    s += PROMPT.format(prompt=prompt)
    think_merge(s, k=k, thinking_budget=think_tokens, thinking_temperature=temperature,
                max_tokens=answer_tokens, temperature=temperature)


def evaluate(problems, url, k, **gen) -> dict[str, dict]:
    """pass@1 of a single trace and of ThinkMerge@k over `problems`."""
    backend = sgl.RuntimeEndpoint(url)
    results = {}
    for name, program, extra in (("single", single, {}), (f"merge@{k}", merged, {"k": k})):
        states = program.run_batch([{"prompt": p["prompt"], **extra, **gen} for p in problems],
                                   backend=backend, progress_bar=True)
        verdicts = [run_tests(extract_code(st["answer"]), p["tests"]) for st, p in zip(states, problems)]
        results[name] = {"score": sum(v.passed for v in verdicts) / max(len(problems), 1),
                         "tokens": sum(answer_tokens(st) for st in states),
                         "verdicts": [v.reason for v in verdicts]}
    return results


def main(argv=None):
    p = parser(__doc__, default_data="problems.jsonl")
    args = p.parse_args(argv)
    results = evaluate(load_jsonl(args.data, args.limit), args.url, args.k)
    print_table(f"pass@1 on {args.data}", results)
    return results


if __name__ == "__main__":
    main()

"""Write your own research flow as an SGLang program, with sgl-merge's tools and `merge_gen`.

Each step the branches think on their own; then they decide as one in the Tongyi / Qwen layout: a
merged choice of `<tool_call>` or `<answer>`, then the call as one merged generation constrained to
the tools' JSON schema (`Toolset.call_schema()`). The tool runs once and its response is appended to
every branch. Branches here keep their own thinking (forks cannot drop text); the packaged agent
(`sgl-merge research`, `sgl_merge.research.agent.ResearchAgent`) shares one history instead, so
every response is prefilled once.

    python programs/web_research.py --url http://127.0.0.1:30000 --k 2 --corpus corpus.jsonl "your question"
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root (and `programs`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402

import sglang as sgl  # noqa: E402

from programs._common import parser  # noqa: E402
from sgl_merge import merge_gen  # noqa: E402
from sgl_merge.research.command import build_toolset  # noqa: E402

SYSTEM = "Research the question with the tools, one call at a time, then answer in <answer></answer>.\n<tools>\n{}\n</tools>"


@sgl.function
def research(s, question, toolset, k=2, max_steps=5, think_tokens=256, temperature=0.7):
    tools = "\n".join(json.dumps(d) for d in toolset.definitions())
    s += f"<|im_start|>system\n{SYSTEM.format(tools)}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
    s += "<|im_start|>assistant\n"
    s["answer"] = None
    branches = s.fork(k)
    trace = []
    try:
        for step in range(1, max_steps + 1):
            for b in branches:  # every branch thinks on its own
                b += "<think>\n" + sgl.gen("thinking", max_tokens=think_tokens, stop="</think>", temperature=temperature)
                b += "\n</think>\n\n"
            last = step == max_steps
            kind = merge_gen(branches, f"kind_{step}", regex="<answer>" if last else "<tool_call>\n|<answer>",
                             max_tokens=16, temperature=temperature)
            if kind.startswith("<answer>"):
                s["answer"] = merge_gen(branches, "answer", stop="</answer>", max_tokens=128, temperature=temperature)
                break
            raw = merge_gen(branches, f"call_{step}", json_schema=json.dumps(toolset.call_schema()), max_tokens=256,
                            temperature=temperature)
            try:
                call = json.loads(raw, strict=False)
                observation = toolset.call(call["name"], call["arguments"]).text
            except (ValueError, KeyError, TypeError):
                call, observation = {"raw": raw}, "That was not a complete tool call."
            trace.append({"step": step, "call": call, "observation": observation[:200]})
            for b in branches:
                b += (f"\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{observation}\n"
                      "</tool_response><|im_end|>\n<|im_start|>assistant\n")
        s["trace"] = trace
    finally:
        branches.join()  # ends the branches' worker threads (and copies their variables into s)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("question")
    p.add_argument("--corpus", required=True, help="JSONL corpus (docid, title/url, text) searched with BM25")
    p.add_argument("--max-steps", type=int, default=5)
    args = p.parse_args(argv)
    toolset = build_toolset("local", corpus=args.corpus)
    state = research.run(question=args.question, toolset=toolset, k=args.k, max_steps=args.max_steps,
                         backend=sgl.RuntimeEndpoint(args.url))
    for t in state["trace"]:
        print(f"step {t['step']}: {json.dumps(t['call'])[:100]} -> {t['observation'][:100]!r}")
    print(f"answer: {state['answer']!r}")
    return state


if __name__ == "__main__":
    main()

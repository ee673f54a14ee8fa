"""A multi-step research agent. At every step each branch thinks on its own, then the branches
choose the next action as one: a merged generation constrained to a JSON action schema
(search / open / answer). The tool's result is appended to every branch; up to a step limit.

Tools are pluggable: `LocalSearch` (BM25 over a folder of .txt / .md files) is the default;
`HttpSearch` calls a search HTTP API you configure (it expects GET {endpoint}?q=QUERY to return a
JSON list of {"id", "title", "snippet", "url"}, and opens a document by fetching its url).

    python programs/web_research.py --url http://127.0.0.1:30000 --k 2 --corpus docs/ "your question"
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root (and `programs`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
import os  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402

import requests  # noqa: E402
import sglang as sgl  # noqa: E402

from programs._common import parser  # noqa: E402
from sgl_merge import merge_gen  # noqa: E402

ACTION_SCHEMA = {
    "type": "object",
    "properties": {"action": {"enum": ["search", "open", "answer"]},
                   "argument": {"type": "string", "maxLength": 60}},
    "required": ["action", "argument"],
    "additionalProperties": False,
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class LocalSearch:
    """BM25 (k1=1.5, b=0.75) over the .txt and .md files of a folder; document ids are file names."""

    def __init__(self, folder: str | Path, k1: float = 1.5, b: float = 0.75):
        self.docs = {p.name: p.read_text(errors="replace") for p in sorted(Path(folder).iterdir())
                     if p.suffix in (".txt", ".md")}
        if not self.docs:
            raise ValueError(f"LocalSearch: no .txt or .md files in {folder}")
        self.k1, self.b = k1, b
        self.tf = {d: Counter(_words(t)) for d, t in self.docs.items()}
        self.avg_len = sum(sum(c.values()) for c in self.tf.values()) / len(self.tf)
        df = Counter(w for c in self.tf.values() for w in c)
        self.idf = {w: math.log(1 + (len(self.tf) - n + 0.5) / (n + 0.5)) for w, n in df.items()}

    def score(self, doc: str, query: str) -> float:
        tf, length = self.tf[doc], sum(self.tf[doc].values())
        return sum(self.idf.get(w, 0.0) * tf[w] * (self.k1 + 1)
                   / (tf[w] + self.k1 * (1 - self.b + self.b * length / self.avg_len)) for w in _words(query))

    def search(self, query: str, k: int = 3) -> list[dict]:
        ranked = sorted(self.docs, key=lambda d: self.score(d, query), reverse=True)
        return [{"id": d, "title": self.docs[d].splitlines()[0][:80], "snippet": self.docs[d][:160]}
                for d in ranked[:k] if self.score(d, query) > 0]

    def open(self, doc_id: str, limit: int = 1500) -> str:
        if doc_id not in self.docs:
            return f"No document {doc_id!r}; open one of the ids a search returned."
        return self.docs[doc_id][:limit]


class HttpSearch:
    """Adapter for a search HTTP API (see the module docstring for what it must return)."""

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 20.0):
        self.endpoint, self.timeout = endpoint, timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.urls: dict[str, str] = {}

    def search(self, query: str, k: int = 3) -> list[dict]:
        r = requests.get(self.endpoint, params={"q": query}, headers=self.headers, timeout=self.timeout)
        r.raise_for_status()
        hits = r.json()[:k]
        self.urls.update({h["id"]: h["url"] for h in hits})
        return [{"id": h["id"], "title": h.get("title", ""), "snippet": h.get("snippet", "")} for h in hits]

    def open(self, doc_id: str, limit: int = 1500) -> str:
        if doc_id not in self.urls:
            return f"No document {doc_id!r}; open one of the ids a search returned."
        return requests.get(self.urls[doc_id], headers=self.headers, timeout=self.timeout).text[:limit]


def act(tool, raw: str) -> tuple[str, str, str]:
    """Run the action in `raw` (JSON by the schema); returns (action, argument, observation)."""
    try:
        action = json.loads(raw)
        kind, arg = action["action"], str(action["argument"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return "invalid", raw[:60], "That was not a valid action; answer with the JSON action format."
    if kind == "search":
        hits = tool.search(arg)
        return kind, arg, "\n".join(f"[{h['id']}] {h['title']}: {h['snippet']}" for h in hits) or "No results."
    if kind == "open":
        return kind, arg, tool.open(arg)
    return kind, arg, ""


@sgl.function
def research(s, question, tool, k=2, max_steps=5, think_tokens=256, temperature=0.7):
    s += (f"Question: {question}\nYou can act with JSON: {{\"action\": \"search\" | \"open\" | \"answer\", "
          "\"argument\": \"...\"}.\n")
    branches = s.fork(k)
    trace = []
    for step in range(1, max_steps + 1):
        for b in branches:  # every branch thinks on its own
            b += f"Step {step}.\n<think>\n"
            b += sgl.gen("thinking", max_tokens=think_tokens, stop="</think>", temperature=temperature)
            b += "</think>\nAction: "
        raw = merge_gen(branches, f"action_{step}", json_schema=json.dumps(ACTION_SCHEMA), max_tokens=128,
                        temperature=temperature)
        kind, arg, observation = act(tool, raw)
        trace.append({"step": step, "action": kind, "argument": arg, "observation": observation[:200]})
        if kind == "answer":
            s["answer"] = arg
            break
        for b in branches:
            b += f"\nObservation: {observation}\n"
    else:
        s["answer"] = None
    s["trace"] = trace
    branches.join()  # ends the branches' worker threads (and copies their variables into s)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("question")
    p.add_argument("--corpus", help="folder of .txt/.md files for the local search tool")
    p.add_argument("--search-endpoint", help="use a search HTTP API instead of --corpus")
    p.add_argument("--search-api-key", default=os.environ.get("SEARCH_API_KEY"))
    p.add_argument("--max-steps", type=int, default=5)
    args = p.parse_args(argv)
    if bool(args.corpus) == bool(args.search_endpoint):
        p.error("give exactly one of --corpus or --search-endpoint")
    tool = LocalSearch(args.corpus) if args.corpus else HttpSearch(args.search_endpoint, args.search_api_key)
    state = research.run(question=args.question, tool=tool, k=args.k, max_steps=args.max_steps,
                         backend=sgl.RuntimeEndpoint(args.url))
    for t in state["trace"]:
        print(f"step {t['step']}: {t['action']}({t['argument']!r}) -> {t['observation'][:100]!r}")
    print(f"answer: {state['answer']!r}")
    return state


if __name__ == "__main__":
    main()

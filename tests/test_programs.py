"""The programs end to end on the small random model (outputs are gibberish: the flow, the tool
calls, the sandbox, the scoring and the error paths are what is tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from programs import solve_math as math_program
from programs import write_code as code_program
from programs import web_research

ROOT = Path(__file__).resolve().parents[1]


def test_extract_boxed():
    assert math_program.extract_boxed("so \\boxed{42}.") == "42"
    assert math_program.extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert math_program.extract_boxed("no box") is None
    assert math_program.extract_boxed("\\boxed{unclosed") is None


def test_math_program_scores_three_methods(server, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in [{"question": "1+1?", "answer": "2"},
                                                       {"question": "2*3?", "answer": "6"}]))
    out = subprocess.run([sys.executable, str(ROOT / "programs" / "solve_math.py"), "--url", server.url, "--k", "2",
                          "--data", str(data), "--think-tokens", "24"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for method in ("single", "vote@2", "merge@2"):
        assert method in out.stdout


def test_code_program_runs_end_to_end(server):
    problems = [{"prompt": "add two numbers", "tests": "assert add(1, 2) == 3"}]
    results = code_program.evaluate(problems, server.url, 2, think_tokens=16, answer_tokens=32)
    assert set(results) == {"single", "merge@2"}
    for r in results.values():
        assert r["score"] == 0.0 and len(r["verdicts"]) == 1  # gibberish never passes


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "merge.md").write_text("Logit averaging\nThinkMerge averages the logits of parallel traces.")
    (tmp_path / "vote.txt").write_text("Majority voting\nSelf-consistency picks the most common answer.")
    (tmp_path / "cats.md").write_text("Cats\nCats sleep most of the day.")
    return tmp_path


def test_local_search_ranks_by_bm25(corpus):
    tool = web_research.LocalSearch(corpus)
    assert tool.search("averages logits")[0]["id"] == "merge.md"
    assert tool.search("common answer voting")[0]["id"] == "vote.txt"
    assert tool.search("quantum") == []
    assert "No document" in tool.open("missing.md")


def test_actions_are_executed_or_reported_invalid(corpus):
    tool = web_research.LocalSearch(corpus)
    assert web_research.act(tool, '{"action": "search", "argument": "cats"}')[2].startswith("[cats.md]")
    assert web_research.act(tool, '{"action": "open", "argument": "vote.txt"}')[2].startswith("Majority")
    assert web_research.act(tool, '{"action": "answer", "argument": "42"}')[:2] == ("answer", "42")
    assert web_research.act(tool, '{"action": "sea')[0] == "invalid"


def test_research_agent_runs_its_steps(server, corpus):
    import sglang as sgl

    state = web_research.research.run(question="What does ThinkMerge average?",
                                      tool=web_research.LocalSearch(corpus), k=2, max_steps=3,
                                      think_tokens=16, backend=sgl.RuntimeEndpoint(server.url))
    trace = state["trace"]
    assert 1 <= len(trace) <= 3
    assert all(t["action"] in ("search", "open", "answer", "invalid") for t in trace)
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200

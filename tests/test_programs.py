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
    docs = [{"docid": "merge", "title": "Logit averaging", "text": "ThinkMerge averages the logits of parallel traces."},
            {"docid": "vote", "title": "Majority voting", "text": "Self-consistency picks the most common answer."}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_research_program_runs_its_steps(server, corpus):
    import sglang as sgl

    toolset = web_research.build_toolset("local", corpus=str(corpus))
    state = web_research.research.run(question="What does ThinkMerge average?", toolset=toolset, k=2, max_steps=3,
                                      think_tokens=16, backend=sgl.RuntimeEndpoint(server.url))
    trace = state["trace"]
    assert len(trace) <= 2  # the third step must answer
    assert all(set(t["call"]) in ({"name", "arguments"}, {"raw"}) and t["observation"] for t in trace)
    assert isinstance(state["answer"], str)  # answered, at the last step at the latest
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200

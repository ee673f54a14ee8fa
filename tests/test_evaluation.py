"""`sgl-merge eval` / `sgl-merge demo`: scoring on fixed cases, the report's statistics, resuming
an interrupted run against the real server, and the demo on the bundled reasoner."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sgl_merge.evaluation import report
from sgl_merge.evaluation.sandbox import extract_code, run_tests
from sgl_merge.evaluation.scoring import correct, last_boxed, math_correct, vote_key
from sgl_merge.testing import ServeProcess, free_port
from sgl_merge.tiny_reasoner import MODEL_DIR

from conftest import TEST_SERVER_FLAGS


@pytest.mark.parametrize("answer, reference, right", [
    ("so the answer is \\boxed{42}", "42", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{1/2}", "\\frac12", True),
    ("\\boxed{x^{2}+1}", "1+x^2", True),
    ("first \\boxed{3} then \\boxed{4}", "4", True),  # the last boxed answer counts
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", True),
    ("\\boxed{41}", "42", False),
    ("42, no box", "42", False),
    ("\\boxed{", "42", False),
])
def test_math_answers_are_checked_by_math_verify(answer, reference, right):
    assert math_correct(answer, reference) is right


def test_last_boxed_and_vote_keys():
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{x_{1}}") == "x_{1}"
    assert vote_key("math", "so \\boxed{7}") == "7" and vote_key("math", "none") is None
    one = "```python\ndef f(x):\n    return x  \n\n```"
    other = "Here:\n```python\ndef f(x):\n\n    return x\n```"
    assert vote_key("code", one) == vote_key("code", other) == "def f(x):\n    return x"


def test_exact_answers_are_compared_whole():
    problem = {"answer": "3,8,0,9"}
    assert correct("exact", "</think>\n\\boxed{3,8,0,9}", problem)
    assert correct("exact", "\\boxed{3, 8, 0, 9}", problem)  # spaces do not count
    assert not correct("exact", "\\boxed{3,8,0,1}", problem)  # one part wrong: all wrong
    assert not correct("exact", "\\boxed{8,3,0,9}", problem) and not correct("exact", "3,8,0,9", problem)
    assert vote_key("exact", "\\boxed{3, 8,0,9}") == vote_key("exact", "\\boxed{3,8,0,9}") == "3,8,0,9"


def test_code_answers_run_in_the_sandbox():
    tests = "assert add(2, 3) == 5"
    assert correct("code", "```python\ndef add(a, b):\n    return a + b\n```", {"tests": tests})
    assert not correct("code", "```python\ndef add(a, b):\n    return a - b\n```", {"tests": tests})
    assert run_tests("def add(a, b):\n    return a - b", tests).reason.startswith("failed: AssertionError")
    assert extract_code("text\n```python\nprint(1)\n```\n") == "print(1)\n"
    assert run_tests("while True:\n    pass", "", timeout_s=2).reason == "timeout"
    assert run_tests("x = []\nwhile True:\n    x.append(bytearray(10**7))", "", memory_mb=200).reason == "memory limit"
    assert run_tests("import sys; sys.exit(3)", "").reason.startswith("failed")
    # The exit status is not the verdict: an answer that exits with 0 before the tests fails them.
    for exits in ("import sys; sys.exit(0)", "import os; os._exit(0)", "quit()", "raise SystemExit"):
        verdict = run_tests(f"def add(a, b):\n    return a - b\n{exits}", tests)
        assert not verdict.passed and "before the tests finished" in verdict.reason, (exits, verdict)
    assert not run_tests("def add(a, b):\n    return a + b", "import sys; sys.exit(0)\nassert False").passed
    # Output cannot forge the verdict either (it goes to a pipe of the harness's own).
    assert not run_tests("print('passed')\nimport os; os._exit(0)", "").passed


def _record(problem, single, vote, merge, sample=0):
    return {"problem": problem, "sample": sample, "thinking_tokens": [10, 12],
            "answers": [{"correct": c, "tokens": 3} for c in single],
            "vote": {"2": {"correct": vote}}, "merge": {"2": {"correct": merge, "tokens": 3}}}


def test_report_intervals_paired_differences_and_tokens(tmp_path):
    rng = np.random.default_rng(1)
    records = [_record(i, [bool(rng.random() < 0.5), bool(rng.random() < 0.5)], bool(rng.random() < 0.6),
                       bool(rng.random() < 0.9)) for i in range(200)]
    summary = report.summarize(records, [2])
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"single", "vote@2", "merge@2"} and summary["problems"] == 200
    for r in rows.values():
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.2
    assert rows["single"]["tokens_per_problem"] == 14.0  # mean of (10+3, 12+3)
    assert rows["vote@2"]["tokens_per_problem"] == 28.0 and rows["merge@2"]["tokens_per_problem"] == 28.0
    paired = {p["comparison"]: p for p in summary["paired"]}
    assert paired["merge@2 - single"]["excludes_zero"] and paired["merge@2 - single"]["difference"] > 0.3
    # samples of one problem count once
    twice = records + [dict(r, sample=1) for r in records]
    assert report.summarize(twice, [2])["problems"] == 200
    report.plot(summary, tmp_path / "a.png", "test")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "merge@2" in report.format_table(summary)


def test_report_rows_and_pairs_of_the_weighted_and_adaptive_merges(tmp_path):
    records = [dict(_record(i, [False, True], False, i % 2 == 0),
                    **{"merge-conf": {"2": {"correct": i % 4 != 3, "tokens": 3, "members": [0, 1]}},
                       "merge-keep": {"2": {"correct": True, "tokens": 3, "members": [1]}}}) for i in range(40)]
    summary = report.summarize(records, [2])
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["merge-conf@2"]["accuracy"] == 0.75 and rows["merge-keep@2"]["accuracy"] == 1.0
    assert rows["merge-conf@2"]["method"] == "merge-conf"
    # one kept member decodes the answer once: 10 + 12 thinking tokens and 3 answer tokens
    assert rows["merge-keep@2"]["tokens_per_problem"] == 25.0 and rows["merge-conf@2"]["tokens_per_problem"] == 28.0
    paired = {p["comparison"]: p for p in summary["paired"]}
    assert paired["merge-conf@2 - merge@2"]["difference"] == 0.25
    assert paired["merge-keep@2 - merge@2"]["difference"] == 0.5 and paired["merge-keep@2 - merge@2"]["excludes_zero"]
    table = report.format_table(summary)
    assert "merge-keep@2 - merge@2" in table and "merge-conf@2" in table
    report.plot(summary, tmp_path / "b.png", "test")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def _eval(url, dataset, out, *extra):
    return [sys.executable, "-m", "sgl_merge.cli", "eval", "--url", url, "--dataset", str(dataset), "--out", str(out),
            "--k", "2", "--thinking-budget", "8", "--answer-tokens", "4", "--prompt", "{question}", *extra]


def test_an_interrupted_eval_resumes_without_recomputing(server, tmp_path):
    dataset = tmp_path / "math.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(40)))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    # As from a terminal: SIGINT at its default even when this test runs in a background job (which
    # starts with SIGINT ignored, and a child would inherit that).
    proc = subprocess.Popen(_eval(server.url, dataset, out, "--concurrency", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle
    assert proc.wait(timeout=60) == 130, proc.stdout.read()[-2000:]
    before = results.read_text().splitlines()
    assert 2 <= len(before) < 40
    with open(results, "a") as f:
        f.write('{"problem": 39, "sam')  # a line torn by the interruption
    again = subprocess.run(_eval(server.url, dataset, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming: {len(before)} problem runs" in again.stdout + again.stderr
    after = results.read_text().splitlines()
    assert after[:len(before)] == before  # finished problems kept, not recomputed
    assert sorted(json.loads(line)["problem"] for line in after) == list(range(40))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 40 and {r["name"] for r in summary["rows"]} == {"single", "vote@2", "merge@2",
                                                                             "parathink@2"}
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    other = subprocess.run(_eval(server.url, dataset, out, "--k", "4"), capture_output=True, text=True)
    assert other.returncode == 1 and "other settings" in other.stderr and "ks" in other.stderr


def test_eval_weightings_score_traces_by_confidence_and_keep_the_most_confident(server, tmp_path):
    dataset = tmp_path / "exact.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"List {i} and {i + 1}.", "answer": f"{i},{i + 1}"}) + "\n"
                               for i in range(6)))
    out = tmp_path / "out"
    r = subprocess.run(_eval(server.url, dataset, out, "--task", "exact", "--k", "2,4", "--thinking-temperature", "1.2",
                             "--weighting", "uniform,confidence,adaptive"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("merge-conf@4", "merge-keep@4", "merge-conf@4 - merge@4", "merge-keep@2 - merge@2"):
        assert name in r.stdout
    for rec in (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()):
        conf = rec["confidence"]
        assert len(conf) == 4 and all(c > 0 for c in conf)
        assert rec["merge-conf"]["4"]["members"] == [0, 1, 2, 3]
        kept = rec["merge-keep"]["4"]["members"]
        assert len(kept) == 2 and min(conf[i] for i in kept) >= max(conf[i] for i in range(4) if i not in kept)
        assert len(rec["merge-keep"]["2"]["members"]) == 1
    bad = subprocess.run(_eval(server.url, dataset, tmp_path / "o2", "--weighting", "loudest"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--weighting takes a list of" in bad.stderr


def test_eval_reports_bad_datasets_by_line(server, tmp_path):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    r = subprocess.run(_eval(server.url, dataset, tmp_path / "out"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{dataset}:2 lacks ['answer']" in r.stderr


@pytest.fixture(scope="module")
def reasoner_server(tmp_path_factory):
    """The bundled tiny reasoner served like any model directory, with the context the demo gives
    it (parathink@4 on parts reads more tokens than its 512 positions)."""
    log = tmp_path_factory.mktemp("reasoner") / "server.log"
    with ServeProcess(["--model-path", str(MODEL_DIR), "--port", str(free_port()), *TEST_SERVER_FLAGS,
                       "--context-length", "4096"], log_path=log,
                      env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}) as srv:
        yield srv


def test_demo_runs_the_methods_on_both_tasks_of_the_bundled_reasoner(reasoner_server, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "sgl_merge.cli", "demo", "--url", reasoner_server.url,
                        "--problems", "24", "--k", "2,4", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "== task chain" in r.stdout and "== task parts" in r.stdout
    for name in ("single", "vote@2", "vote@4", "merge@2", "merge@4", "merge-conf@4", "merge-keep@4",
                 "merge@4 - single", "merge@4 - vote@4", "merge-conf@4 - merge@4", "parathink@2", "parathink@4",
                 "parathink@4 - merge@4"):
        assert name in r.stdout
    # Traces: ~50 tokens for one chain, ~110 for four; each model answer is in its task's format.
    for task, (low, high) in (("chain", (20, 128)), ("parts", (60, 192))):
        summary = json.loads((out / task / "summary.json").read_text())
        rows = {row["name"]: row for row in summary["rows"]}
        assert summary["problems"] == 24
        assert 0.05 <= rows["single"]["accuracy"] <= 0.95, (task, rows["single"])  # right only part of the time
        records = [json.loads(line) for line in (out / task / "results.jsonl").read_text().splitlines()]
        assert all(len(rec["thinking_tokens"]) == 4 and low <= np.mean(rec["thinking_tokens"]) <= high
                   for rec in records), task
        assert (out / task / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    answers = [a["text"] for line in (out / "parts" / "results.jsonl").read_text().splitlines()
               for a in json.loads(line)["answers"]]
    assert sum(re.fullmatch(r"\\boxed\{\d,\d,\d,\d\}", a.strip()) is not None for a in answers) >= 0.9 * len(answers)

"""The research agent end to end on a real CPU server (the shared test server: a small random Qwen2
model): merged decisions equal an independent reference (transformers' logits, averaged, masked by
the same grammar with xgrammar), one shared history is prefilled once per step while K own histories
are prefilled K times, tool failures become observations, and `sgl-merge research` runs as a user
runs it (live progress, answer, sources, trace.json; configuration errors before the first step)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from sgl_merge.research.agent import AgentConfig, ResearchAgent
from sgl_merge.research.command import build_toolset
from sgl_merge.research.search import SearchTool
from sgl_merge.research.tools import Tool, Toolset
from sgl_merge.research.visit import VisitTool
from tests.merge_reference import TIE_TOLERANCE, merge_rows, next_logits

CORPUS = [
    {"docid": "belor", "title": "Belor", "url": "https://wiki.example/belor",
     "text": "Belor is a city. Belor was founded by Kamo Tesh."},
    {"docid": "kamo", "title": "Kamo Tesh", "url": "https://wiki.example/kamo-tesh",
     "text": "Kamo Tesh is a person. Kamo Tesh was born in Duvar."},
    {"docid": "belar", "title": "Belar", "url": "https://wiki.example/belar",
     "text": "Belar is a city. Belar was founded by Kamo Tash."},
]
SYSTEM = "Answer with tools.\n<tools>\n{tools}\n</tools>\nDate: {date}"
QUESTION = "Where was the founder of Belor born?"


class ShortSearch(SearchTool):
    """The search tool with short queries, so a random model's merged call closes within its budget."""

    def __init__(self, backend, top_k):
        super().__init__(backend, top_k)
        self.parameters = {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "maxLength": 8}}}}


class ShortVisit(VisitTool):
    parameters = {"type": "object", "properties": {
        "url": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "maxLength": 30}},
        "goal": {"type": "string", "maxLength": 8}}, "required": ["url", "goal"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return path


@pytest.fixture(scope="module")
def toolset(corpus):
    backend = build_toolset("local", corpus=str(corpus)).tools["search"].backend
    yield Toolset([ShortSearch(backend, top_k=2), ShortVisit(backend, max_chars=300)])


def _agent(server, toolset, **config):
    cfg = AgentConfig(**{"k": 3, "max_steps": 3, "think_tokens": 24, "call_tokens": 96, "answer_tokens": 12,
                         "temperature": 0.8, "seed": 7, "system_prompt": SYSTEM, **config})
    return ResearchAgent(server.url, toolset, cfg)


# ------------------------------------------------------------------ merged decisions are exact


def _grammar_reference(model, tokenizer, contexts, produced, grammar) -> None:
    """Replay `produced` (a merged greedy decision) against transformers: at each step the K rows are
    averaged (mode logits), masked by `grammar` (xgrammar, as the server compiles it), and the
    produced token must be the argmax (or within TIE_TOLERANCE of it)."""
    import xgrammar as xgr

    vocab = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgr.GrammarCompiler(info)
    kind, text = grammar
    compiled = (compiler.compile_regex(text) if kind == "regex"
                else compiler.compile_json_schema(text, any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    contexts = [list(c) for c in contexts]
    for token in produced:
        if matcher.is_terminated():
            break
        row = merge_rows(next_logits(model, contexts), "logits").float()[None]
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(row, bitmask)
        best = row[0].argmax().item()
        assert token == best or row[0, best] - row[0, token] < TIE_TOLERANCE, (token, best)
        assert matcher.accept_token(token)
        for c in contexts:
            c.append(token)


def test_merged_tool_call_equals_the_reference(server, toolset, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    agent = _agent(server, toolset, temperature=0.0, think_tokens=12, record_ids=True, min_calls=1, max_steps=2)
    trace = agent.run(QUESTION)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first = trace.steps[0]
    assert first.action == "tool_call" and first.ids is not None
    contexts = first.ids["contexts"]
    _grammar_reference(model, tokenizer, contexts, first.ids["kind"], ("regex", "<tool_call>\n"))
    after_kind = [c + first.ids["kind"] for c in contexts]
    _grammar_reference(model, tokenizer, after_kind, first.ids["decision"], ("json", agent.schema))
    # The call in the trace is exactly the merged tokens, and it ran.
    call_ids = first.ids["decision"][:-1] if first.ids["decision"][-1] == tokenizer.eos_token_id else first.ids["decision"]
    assert json.loads(tokenizer.decode(call_ids), strict=False) == first.call
    assert first.call["name"] in ("search", "visit") and first.observation


# ------------------------------------------------------------------ one shared history


@pytest.mark.parametrize("k", [4])
def test_shared_history_prefills_each_observation_once(server, toolset, k):
    traces = {}
    for history in ("shared", "own"):
        agent = _agent(server, toolset, k=k, history=history, min_calls=3, max_steps=3)
        traces[history] = agent.run(QUESTION)
        assert [s.action for s in traces[history].steps] == ["tool_call", "tool_call", "answer"], history
    shared, own = traces["shared"].steps, traces["own"].steps
    for before, step in zip(shared, shared[1:]):
        new = step.history_tokens - before.history_tokens  # the previous call and its observation
        # At most once (the prefill before the K branches think; less where an earlier test's run left
        # the same call in the cache), plus a few tokens per branch and request: the last prompt token
        # SGLang always recomputes, each branch's thinking close.
        assert step.prefilled_tokens <= new + k * 12, (new, step.prefilled_tokens)
    for before, step in zip(own, own[1:]):
        observation = step.history_tokens - before.history_tokens - before.thinking_tokens // k
        assert step.prefilled_tokens >= k * observation // 2, (observation, step.prefilled_tokens)
    later = sum(s.prefilled_tokens for s in shared[1:]), sum(s.prefilled_tokens for s in own[1:])
    assert later[0] * 2 < later[1], later


# ------------------------------------------------------------------ failures are observations


class _Pages(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>gone</body></html>")

    def log_message(self, *args):
        pass


def test_a_failing_tool_is_an_observation_and_the_agent_goes_on(server, corpus):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        tools = build_toolset("local", corpus=str(corpus))

        class MissingPage(Tool):  # every call visits a page that is gone
            name, parameters = "open_page", {"type": "object", "properties": {}, "additionalProperties": False}

            def run(self, arguments):
                return tools.tools["visit"].run({"url": [f"http://127.0.0.1:{httpd.server_port}/x"], "goal": "g"})

        agent = _agent(server, Toolset([MissingPage()]), min_calls=2, max_steps=3)
        trace = agent.run(QUESTION)
    finally:
        httpd.shutdown()
    calls = [s for s in trace.steps if s.action == "tool_call"]
    assert len(calls) == 2 and all(not s.observation_ok and "404" in s.observation for s in calls), \
        [(s.call, s.observation) for s in calls]
    assert trace.steps[-1].action == "answer" and trace.answer is not None


# ------------------------------------------------------------------ the command


def _research(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sgl_merge.cli", "research", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_research_command_runs_and_writes_its_trace(server, corpus, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text(SYSTEM)
    r = _research(QUESTION, "--url", server.url, "--k", "2", "--search", "local", "--corpus", str(corpus),
                  "--max-steps", "2", "--min-calls", "1", "--think-tokens", "16", "--answer-tokens", "8", "--page-chars", "200",
                  "--system-prompt", str(system), "--seed", "3", "--out", str(tmp_path / "out"),
                  "--index-cache", str(tmp_path / "bm25"))
    assert r.returncode in (0, 1), r.stderr
    assert len(list((tmp_path / "bm25").iterdir())) == 1  # the corpus's index, kept for the next run
    assert "step 1: thinking ..." in r.stdout and "step 2: thinking (must answer now) ..." in r.stdout
    assert "branches agreed]\n    -> " in r.stdout and "trace: " in r.stdout
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["question"] == QUESTION and trace["k"] == 2 and len(trace["steps"]) <= 2
    assert all(len(s["thinking"]) == 2 for s in trace["steps"])
    assert trace["totals"]["steps"] == len(trace["steps"])
    assert (r.returncode == 0) == (trace["answer"] is not None)
    if trace["answer"] is not None:
        # (as read in text mode: a "\r" the random model wrote arrives as a newline)
        printed = trace["answer"].replace("\r\n", "\n").replace("\r", "\n")
        assert f"answer: {printed}" in r.stdout


def test_research_command_reports_bad_configuration_before_the_first_step(server, tmp_path):
    r = _research("q", "--url", server.url, "--search", "local")
    assert r.returncode == 2 and "--corpus" in r.stderr and "step 1" not in r.stdout
    r = _research("q", "--url", server.url, "--search", "searxng")
    assert r.returncode == 2 and "--searxng-url" in r.stderr
    r = _research("q", "--url", server.url, "--search", "none", "--mcp", str(tmp_path / "no-such-server"))
    assert r.returncode == 2 and "no-such-server" in r.stderr
    r = _research("q", "--url", server.url, "--search", "mcp")
    assert r.returncode == 2 and "--mcp SPEC" in r.stderr
    r = _research("q", "--url", server.url, "--search", "bing")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_eval_research_compares_single_vote_and_merge_and_resumes(server, tmp_path):
    from sgl_merge.research.synthetic import CORPUS, HELDOUT

    argv = ["eval", "--task", "research", "--dataset", str(HELDOUT), "--corpus", str(CORPUS), "--url", server.url,
            "--limit", "2", "--k", "2", "--max-steps", "2", "--think-tokens", "8", "--answer-tokens", "6",
            "--page-chars", "150", "--index-cache", str(tmp_path / "bm25"), "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-m", "sgl_merge.cli", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "bm25").iterdir())) == 1
    for row in ("single", "vote@2", "merge@2", "merge@2 - vote@2"):
        assert f"\n{row} " in r.stdout, row
    assert "tool calls" in r.stdout and "prefilled" in r.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(rec["problem"] for rec in records) == [0, 1]
    for rec in records:
        assert len(rec["answers"]) == 2 and set(rec["vote"]) == set(rec["merge"]) == {"2"}
        assert rec["merge"]["2"]["steps"] >= 1 and rec["merge"]["2"]["total_tokens"] > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["name"] for row in summary["agents"]] == ["single", "vote@2", "merge@2"]
    again = subprocess.run([sys.executable, "-m", "sgl_merge.cli", *argv], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming: 2 problems" in again.stdout + again.stderr
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2
    changed = subprocess.run([sys.executable, "-m", "sgl_merge.cli", *argv[:-2], "--max-steps", "3", "--out",
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 1 and "max_steps" in changed.stderr


def test_chat_layout_calls_tools_through_the_servers_parser(server, toolset):
    from sgl_merge.research.chat_agent import CHAT_SYSTEM_PROMPT, ChatResearchAgent

    cfg = AgentConfig(k=2, max_steps=3, min_calls=2, think_tokens=12, call_tokens=96, answer_tokens=48,
                      temperature=0.8, seed=5, system_prompt=CHAT_SYSTEM_PROMPT)
    events = []
    trace = ChatResearchAgent(server.url, toolset, cfg, on_event=lambda kind, data: events.append(kind)).run(QUESTION)
    assert [s.action for s in trace.steps] == ["tool_call", "tool_call", "answer"]
    for step in trace.steps:
        assert len(step.thinking) == 2 and step.thinking_tokens > 0 and step.prompt_tokens > 0
        assert step.agreed is not None and 0 <= step.agreed <= 2
    for step in trace.steps[:2]:  # each call ran, or says why it could not
        assert step.observation and (step.call.get("name") in toolset.tools or "raw" in step.call)
    assert trace.answer is not None and events.count("step") == 3 and events.count("decision") == 3


# ------------------------------------------------------------------ web search and MCP tools

MCP_SERVER = f"{sys.executable} {Path(__file__).parent / 'research_mcp_server.py'}"


class _Web(BaseHTTPRequestHandler):
    """A SearXNG instance's JSON API and the pages its results point to."""

    searches: list[str] = []

    def do_GET(self):
        from urllib.parse import parse_qs, urlparse

        url = urlparse(self.path)
        if url.path == "/search":
            _Web.searches.append(parse_qs(url.query)["q"][0])
            base = f"http://127.0.0.1:{self.server.server_port}"
            body = json.dumps({"results": [{"url": f"{base}/kamo", "title": "Kamo Tesh",
                                            "content": "Kamo Tesh was born in Duvar."}]}).encode()
            kind = "application/json"
        else:
            body = (b"<html><head><title>Kamo Tesh</title></head><body><nav>Home | About</nav><article><h1>Kamo"
                    b" Tesh</h1><p>Kamo Tesh is a person. Kamo Tesh was born in Duvar, a city on the river.</p>"
                    b"</article><footer>Contact</footer></body></html>")
            kind = "text/html"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_mcp_tools_join_the_merged_calls_schema():
    tools = build_toolset("none", mcp=[f"{MCP_SERVER} --tools lookup,explode"], visit=False)
    try:
        schema = tools.call_schema()
        names = {branch["properties"]["name"]["const"]: branch["properties"]["arguments"] for branch in schema["anyOf"]}
        assert set(names) == {"lookup", "explode"}
        assert names["lookup"]["properties"]["term"]["type"] == "string"
        assert tools.call("lookup", {"term": "Jostedalsbreen"}).text.startswith("Jostedalsbreen is the largest")
        failed = tools.call("explode", {"reason": "test"})
        assert not failed.ok and "exploded: test" in failed.text
    finally:
        tools.close()


def test_research_command_with_searxng_and_an_mcp_server(server, tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    system = tmp_path / "system.txt"
    system.write_text(SYSTEM)
    try:
        r = _research(QUESTION, "--url", server.url, "--k", "2", "--search", "searxng", "--searxng-url",
                      f"http://127.0.0.1:{httpd.server_port}", "--mcp", f"{MCP_SERVER} --tools lookup",
                      "--min-calls", "2", "--max-steps", "3", "--think-tokens", "12", "--answer-tokens", "8",
                      "--temperature", "0.9", "--seed", "11", "--system-prompt", str(system),
                      "--out", str(tmp_path / "out"))
    finally:
        httpd.shutdown()
    assert r.returncode in (0, 1), r.stderr
    steps = json.loads((tmp_path / "out" / "trace.json").read_text())["steps"]
    assert [s["action"] for s in steps[:2]] == ["tool_call", "tool_call"]
    for s in steps[:2]:
        assert s["observation"] and (s["call"].get("name") in ("search", "visit", "lookup") or "raw" in s["call"])
    searched = [s for s in steps if (s["call"] or {}).get("name") == "search"]
    assert len(_Web.searches) >= len(searched)  # every merged search reached the SearXNG endpoint
    left = subprocess.run(["pgrep", "-f", "research_mcp_server.py --tools lookup$"], capture_output=True, text=True)
    assert left.stdout == "", "the MCP server outlived the command"


@pytest.mark.parametrize("chat", [False, True])
def test_goal_directed_visit_shows_the_models_extract_not_the_page(server, corpus, chat):
    from sgl_merge.frontend.merge import ServerClient
    from sgl_merge.research.extract import GoalExtractor

    extractor = GoalExtractor(ServerClient(server.url), max_tokens=8, chat=chat)
    tools = build_toolset("local", corpus=str(corpus), extract=extractor)
    obs = tools.call("visit", {"url": ["https://wiki.example/belor"], "goal": "who founded Belor"})
    assert obs.ok and obs.sources == ["https://wiki.example/belor"]
    assert "Belor was founded by Kamo Tesh." not in obs.text  # the page itself stays out of the history
    extract = obs.text.split("\n\n", 1)[1]
    assert extract and extract == extractor("who founded Belor", "Belor\n\n" + CORPUS[0]["text"])  # greedy


# ------------------------------------------------------------------ the demo's research task


@pytest.mark.server
def test_demo_research_task_runs_the_trained_model_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sgl_merge.cli", "demo", "--tasks", "research", "--problems", "3",
                        "--k", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "== task research: 3 problems" in r.stdout
    for row in ("single", "vote@2", "merge@2", "merge@2 - vote@2"):
        assert f"\n{row} " in r.stdout, row
    records = [json.loads(line) for line in (tmp_path / "research" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    agents = [a for rec in records for a in rec["answers"]] + [rec["merge"]["2"] for rec in records]
    # The trained layout is what the agent speaks: its calls are valid searches, its answers plain names.
    assert all(a["tool_calls"] >= 1 and a["answer"] for a in agents)
    assert not any(a["answer"].startswith("<") for a in agents)

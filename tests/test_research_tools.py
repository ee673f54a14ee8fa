"""The research agent's tools against servers on the loopback interface, no network and no SGLang
server: a web site (pages, redirects, errors, a slow page, a PDF, oversized pages) with a SearXNG
and a Serper endpoint, a local JSONL corpus, and an MCP stdio server
(tests/research_mcp_server.py)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from sgl_merge.research.mcp_tools import connect_mcp
from sgl_merge.research.search import DDGS, LocalCorpus, SearchTool, SearXNG, Serper, make_backend
from sgl_merge.research.tools import Observation, Tool, ToolConfigError, ToolFailure, Toolset
from sgl_merge.research.visit import VisitTool
from sgl_merge.testing import free_port

ARTICLE = """<!doctype html><html><head><title>Glaciers of Norway</title>
<script>var tracking = "SCRIPT_SECRET";</script><style>body { color: black; }</style></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li>
<li><a href="/login">NAVIGATION_LINK Log in</a></li></ul></nav>
<main><article><h1>Glaciers of Norway</h1>
<p>Jostedalsbreen is the largest glacier in continental Europe, covering about 474 square kilometres
in the county of Vestland.</p>
<p>The glacier has retreated considerably since the Little Ice Age, and its outlet arms such as
Nigardsbreen are popular with hikers who join guided walks on the ice.</p>
<p>Scientists have measured the ice thickness with radar, finding depths of up to 600 metres in the
central plateau.</p></article></main>
<footer><p>FOOTER_TEXT Copyright 2024 Example Encyclopedia. All rights reserved.</p></footer>
</body></html>"""

SEARXNG_RESULTS = [{"url": "https://example.org/jostedalsbreen", "title": "Jostedalsbreen",
                    "content": "The largest glacier in continental Europe."},
                   {"url": "https://example.org/nigardsbreen", "title": "Nigardsbreen",
                    "content": "An arm of Jostedalsbreen."}]

SERPER_KEY = "test-key"


class Site(BaseHTTPRequestHandler):
    """The loopback web site: one route a behaviour the tools must handle."""

    def do_GET(self):
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if url.path == "/article":
            self._send(200, "text/html; charset=utf-8", ARTICLE.encode())
        elif url.path == "/notes.txt":
            self._send(200, "text/plain", b"Plain notes: Nigardsbreen is an arm of Jostedalsbreen.")
        elif parts[0] == "redirect":
            hops = int(parts[1])
            self.send_response(302)
            self.send_header("Location", f"/redirect/{hops - 1}" if hops else "/article")
            self.end_headers()
        elif url.path == "/missing":
            self._send(404, "text/html", b"<html><body>not here</body></html>")
        elif url.path == "/broken":
            self._send(500, "text/html", b"<html><body>server error</body></html>")
        elif url.path == "/slow":
            time.sleep(2)
            self._send(200, "text/html", ARTICLE.encode())
        elif url.path == "/trickle":
            self._trickle()
        elif url.path == "/paper.pdf":
            self._send(200, "application/pdf", b"%PDF-1.4 binary")
        elif url.path == "/big":
            self._send(200, "text/html", b"<p>" + b"x" * 100_000 + b"</p>")
        elif url.path == "/big-unannounced":
            self._send(200, "text/html", b"<p>" + b"x" * 100_000 + b"</p>", length=False)
        elif url.path == "/empty":
            self._send(200, "text/html", b"<html><body></body></html>")
        elif url.path.endswith("/search"):
            self._searxng(url)
        else:
            self._send(404, "text/plain", b"no such page")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("X-API-KEY") != SERPER_KEY:
            self._send(403, "application/json", b'{"message": "Unauthorized"}')
        elif body["q"] == "boom":
            self._send(500, "application/json", b"{}")
        else:
            organic = [{"title": "Jostedalsbreen", "link": "https://example.org/jostedalsbreen",
                        "snippet": f"About {body['q']}."}]
            self._send(200, "application/json", json.dumps({"organic": organic}).encode())

    def _searxng(self, url):
        query = parse_qs(url.query)
        if url.path.startswith("/locked") or query.get("format") != ["json"]:
            self._send(403, "text/html", b"Forbidden")
        elif query["q"] == ["boom"]:
            self._send(500, "text/html", b"error")
        else:
            results = [] if query["q"] == ["nothing"] else SEARXNG_RESULTS
            self._send(200, "application/json", json.dumps({"results": results}).encode())

    def _send(self, status, kind, body, *, length=True):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self):
        """A page that sends a little every 0.2 s for 3 s: no single read is slow, the page is."""
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        try:
            for _ in range(15):
                self.wfile.write(b"<p>more</p>")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # The client gave up, as it should.

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    """The loopback web site's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def visit():
    tool = VisitTool(timeout_s=0.5, max_bytes=50_000, max_redirects=5)
    yield tool
    tool.close()


CORPUS = [
    {"docid": "d1", "title": "Jostedalsbreen", "url": "https://example.org/jostedalsbreen",
     "text": "Jostedalsbreen is a glacier in Norway. It is the largest glacier in continental Europe."},
    {"docid": "d2", "title": "Python (programming language)",
     "text": "Python is a programming language. Guido van Rossum created Python in 1991."},
    {"docid": "d3", "text": "Cats are small furry mammals.\nThey are kept as pets in many homes."},
]


@pytest.fixture
def corpus_path(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return path


# --- the local corpus ---------------------------------------------------------------------------


def test_corpus_ranks_the_matching_document_first(corpus_path):
    corpus = LocalCorpus(corpus_path)
    hits = corpus.search("who created Python", 3)
    assert hits[0].docid == "d2"
    assert hits[0].url == "corpus://d2"  # no url in the corpus: a stable corpus:// one
    assert hits[0].snippet == "Guido van Rossum created Python in 1991."  # the sentence that matched
    assert corpus.search("largest glacier", 1)[0].url == "https://example.org/jostedalsbreen"
    assert corpus.search("zebra quantum", 3) == []
    assert corpus.search("furry", 5)[0].title == "Cats are small furry mammals."  # no title: the first line


def test_corpus_documents_by_url_or_docid(corpus_path):
    corpus = LocalCorpus(corpus_path)
    assert corpus.document("corpus://d2") == corpus.document("d2")
    assert corpus.document("https://example.org/jostedalsbreen")[0] == "Jostedalsbreen"
    assert corpus.document("corpus://nope") is None


def _results(corpus, queries=("who created Python", "largest glacier", "furry pets", "zebra")):
    return [[(h.docid, h.url, h.snippet) for h in corpus.search(q, 3)] for q in queries]


def test_corpus_index_is_saved_and_read_back(corpus_path, tmp_path):
    cache = tmp_path / "cache"
    fresh = LocalCorpus(corpus_path)
    first = LocalCorpus(corpus_path, cache)
    assert not first.index_loaded and first.index_path.parent == cache and first.index_path.is_dir()
    assert [p.name for p in cache.iterdir()] == [first.index_path.name]  # no staging folder left
    again = LocalCorpus(corpus_path, cache)
    assert again.index_loaded and again.index_path == first.index_path
    assert _results(again) == _results(first) == _results(fresh)
    assert _results(fresh)[0][0][0] == "d2"
    # Other bytes, another index: never one of a different corpus.
    corpus_path.write_text(corpus_path.read_text() + json.dumps({"docid": "d4", "text": "Python snakes."}) + "\n")
    changed = LocalCorpus(corpus_path, cache)
    assert not changed.index_loaded and changed.index_path != first.index_path
    assert {h.docid for h in changed.search("python", 5)} == {"d2", "d4"}


def test_corpus_index_torn_or_unwritable_is_built_again(corpus_path, tmp_path, caplog):
    cache = tmp_path / "cache"
    saved = LocalCorpus(corpus_path, cache).index_path
    for f in saved.iterdir():
        f.write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="sgl_merge"):
        rebuilt = LocalCorpus(corpus_path, cache)
    assert not rebuilt.index_loaded and "cannot be read" in caplog.text
    assert _results(rebuilt) == _results(LocalCorpus(corpus_path))
    assert LocalCorpus(corpus_path, cache).index_loaded  # saved over the torn one
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level("WARNING", logger="sgl_merge"):
        uncached = LocalCorpus(corpus_path, blocked)
    assert "could not save the BM25 index" in caplog.text and _results(uncached) == _results(rebuilt)


@pytest.mark.parametrize("lines, message", [
    (['{"docid": "a", "text": "fine"}', "not json"], "line 2 is not JSON"),
    (['{"docid": "a", "text": "fine"}', "", '{"text": "no id"}'], "line 3 has no 'docid'"),
    (['{"docid": "a"}'], "line 1 has no 'text'"),
    (['["a", "list"]'], "line 1 is not a JSON object"),
    (['{"docid": "a", "text": "x"}', '{"docid": "a", "text": "y"}'], "line 2: docid 'a' appears twice"),
    (["", "  "], "has no documents"),
])
def test_corpus_bad_lines_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ToolConfigError, match=message):
        LocalCorpus(path)


def test_corpus_line_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"docid": "a", "text": "fine"}\n{"docid": "b", "text": "caf\xe9"}\n')
    with pytest.raises(ToolConfigError, match="line 2 is not JSON"):
        LocalCorpus(path)


def test_corpus_missing_file(tmp_path):
    with pytest.raises(ToolConfigError, match="does not exist"):
        LocalCorpus(tmp_path / "nope.jsonl")


# --- the search tool ----------------------------------------------------------------------------


def test_search_tool_formats_like_tongyi(corpus_path):
    tool = SearchTool(LocalCorpus(corpus_path), top_k=2)
    assert tool.parameters["properties"]["query"]["type"] == "array"
    assert tool.parameters["required"] == ["query"]
    obs = tool.run({"query": ["Python creator", "zebra quantum"]})
    first, second = obs.text.split("\n=======\n")
    assert first.startswith("A search for 'Python creator' found 1 results:\n\n## Web Results\n"
                            "1. [Python (programming language)](corpus://d2)\n")
    assert second == "No results found for 'zebra quantum'. Try a more general query."
    assert obs.sources == ["corpus://d2"]
    assert tool.run({"query": "glacier"}).sources == ["https://example.org/jostedalsbreen"]  # a string query


def test_search_with_no_results_anywhere_fails(corpus_path):
    with pytest.raises(ToolFailure, match="No results found for 'zebra'. Try a more general query."):
        SearchTool(LocalCorpus(corpus_path)).run({"query": ["zebra"]})


@pytest.mark.parametrize("arguments", [{}, {"query": 3}, {"query": [1, 2]}, {"query": ["", " "]},
                                       {"query": ["q"] * 6}])
def test_search_bad_arguments(corpus_path, arguments):
    with pytest.raises(ToolFailure):
        SearchTool(LocalCorpus(corpus_path)).run(arguments)


def test_searxng(site):
    tool = SearchTool(SearXNG(site), top_k=1)
    obs = tool.run({"query": ["glacier", "nothing"]})
    assert "1. [Jostedalsbreen](https://example.org/jostedalsbreen)\nThe largest glacier" in obs.text
    assert "Nigardsbreen" not in obs.text  # top_k=1
    assert "No results found for 'nothing'" in obs.text
    assert obs.sources == ["https://example.org/jostedalsbreen"]
    with pytest.raises(ToolFailure, match="HTTP 500"):
        SearXNG(site).search("boom", 3)
    with pytest.raises(ToolFailure, match="search.formats"):
        SearXNG(site + "/locked").search("glacier", 3)


def test_serper(site, monkeypatch):
    hits = Serper(SERPER_KEY, endpoint=site + "/serper").search("glaciers", 5)
    assert [(h.title, h.url, h.snippet) for h in hits] == [
        ("Jostedalsbreen", "https://example.org/jostedalsbreen", "About glaciers.")]
    with pytest.raises(ToolFailure, match="SERPER_API_KEY"):
        Serper("wrong", endpoint=site + "/serper").search("glaciers", 5)
    with pytest.raises(ToolFailure, match="HTTP 500"):
        Serper(SERPER_KEY, endpoint=site + "/serper").search("boom", 5)
    with pytest.raises(ToolFailure, match="could not be reached"):
        Serper(SERPER_KEY, endpoint=f"http://127.0.0.1:{free_port()}/search").search("glaciers", 5)
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(ToolConfigError, match="SERPER_API_KEY"):
        Serper()
    monkeypatch.setenv("SERPER_API_KEY", SERPER_KEY)
    assert isinstance(make_backend("serper"), Serper)


def test_ddgs_network_failure_is_a_tool_failure(monkeypatch):
    # ddgs reads a proxy from DDGS_PROXY; a closed loopback port refuses every engine at once.
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ToolFailure, match="the web search failed"):
        DDGS().search("glaciers", 3)


def test_make_backend(corpus_path, site):
    assert isinstance(make_backend("local", corpus=corpus_path), LocalCorpus)
    assert isinstance(make_backend("searxng", searxng_url=site), SearXNG)
    assert isinstance(make_backend("ddgs"), DDGS)
    for kind, message in [("local", "--corpus"), ("searxng", "--searxng-url"), ("bing", "local, searxng")]:
        with pytest.raises(ToolConfigError, match=message):
            make_backend(kind)
    with pytest.raises(ToolConfigError, match="not an http"):
        make_backend("searxng", searxng_url="localhost:8888")


# --- the visit tool -----------------------------------------------------------------------------


def test_visit_extracts_the_article(site, visit):
    obs = visit.run({"url": [site + "/article"], "goal": "size of Jostedalsbreen"})
    assert obs.text.startswith(f'The useful information in {site}/article for goal "size of Jostedalsbreen":\n\n')
    assert "474 square kilometres" in obs.text and "600 metres" in obs.text
    for noise in ("NAVIGATION_LINK", "FOOTER_TEXT", "SCRIPT_SECRET", "<p>", "color: black"):
        assert noise not in obs.text
    assert obs.sources == [site + "/article"]


def test_visit_several_urls_and_failures_in_place(site, visit):
    obs = visit.run({"url": [site + "/notes.txt", site + "/missing", site + "/paper.pdf"], "goal": "glaciers"})
    notes, missing, pdf = obs.text.split("\n=======\n")
    assert "Plain notes: Nigardsbreen" in notes
    assert missing == f"Could not read {site}/missing: the server answered HTTP 404 Not Found"
    assert pdf == f"Could not read {site}/paper.pdf: it is application/pdf, not a web page"
    assert obs.sources == [site + "/notes.txt"]


@pytest.mark.parametrize("path, reason", [
    ("/broken", "HTTP 500"),
    ("/slow", "timed out after 0.5 s"),
    ("/trickle", "timed out after 0.5 s"),
    ("/redirect/7", "redirected more than 5 times"),
    ("/big", "larger than 50000 bytes"),
    ("/big-unannounced", "larger than 50000 bytes"),
    ("/empty", "no readable text"),
    ("/paper.pdf", "application/pdf, not a web page"),
])
def test_visit_failures(site, visit, path, reason):
    with pytest.raises(ToolFailure, match=reason):
        visit.run({"url": site + path, "goal": "anything"})


def test_visit_follows_redirects_within_the_limit(site, visit):
    assert "474 square kilometres" in visit.run({"url": site + "/redirect/4", "goal": "size"}).text


def test_visit_rejects_non_http_urls(visit):
    with pytest.raises(ToolFailure, match="not an http"):
        visit.run({"url": ["file:///etc/passwd", "javascript:alert(1)", "http://[::1", "http:///path"], "goal": "x"})


def test_visit_truncates_caches_and_extracts(site):
    seen = []

    def summarise(goal, text):
        seen.append(text)
        return f"summary for {goal}"

    tool = VisitTool(max_chars=40, extract=summarise)
    assert tool.run({"url": site + "/article", "goal": "size"}).text.endswith("\n\nsummary for size")
    assert seen[0].startswith("Glaciers of Norway") and "more characters not shown" in seen[0]
    tool.close()  # a second visit of the page is served from the cache
    assert tool.run({"url": site + "/article", "goal": "depth"}).text.endswith("\n\nsummary for depth")
    assert seen[1] == seen[0]


def test_visit_reads_corpus_documents_offline(corpus_path):
    tool = VisitTool(LocalCorpus(corpus_path))
    obs = tool.run({"url": ["corpus://d2", "https://example.org/jostedalsbreen"], "goal": "facts"})
    assert "Guido van Rossum created Python in 1991." in obs.text
    assert "largest glacier in continental Europe" in obs.text
    assert obs.sources == ["corpus://d2", "https://example.org/jostedalsbreen"]
    with pytest.raises(ToolFailure, match="nor a document of the corpus"):
        tool.run({"url": "corpus://nope", "goal": "facts"})


@pytest.mark.parametrize("arguments", [{"goal": "x"}, {"url": [], "goal": "x"}, {"url": ["a", 3], "goal": "x"},
                                       {"url": "https://example.org"}, {"url": "https://example.org", "goal": " "}])
def test_visit_bad_arguments(visit, arguments):
    with pytest.raises(ToolFailure):
        visit.run(arguments)


def test_visit_config_errors():
    with pytest.raises(ToolConfigError, match="max_chars"):
        VisitTool(max_chars=0)


# --- MCP ----------------------------------------------------------------------------------------

MCP_SCRIPT = Path(__file__).with_name("research_mcp_server.py")
MCP_SERVER = shlex.join([sys.executable, str(MCP_SCRIPT)])


@pytest.fixture(scope="module")
def mcp_server():
    server = connect_mcp(MCP_SERVER, timeout_s=10)
    yield server
    server.close()


def _alive(pid: int) -> bool:
    """Whether the process exists (a zombie, not reaped, counts as left over)."""
    return os.path.exists(f"/proc/{pid}")


def test_mcp_tools_come_through(mcp_server):
    tools = {t.name: t for t in mcp_server.tools()}
    assert set(tools) == {"lookup", "explode", "wait", "pid"}
    lookup = tools["lookup"]
    assert lookup.description == "Look a term up in a tiny encyclopedia."
    assert lookup.parameters["properties"]["term"]["type"] == "string"
    assert lookup.parameters["required"] == ["term"]
    assert lookup.run({"term": "Jostedalsbreen"}).text == "Jostedalsbreen is the largest glacier in continental Europe."
    with pytest.raises(ToolFailure, match="exploded: on purpose"):
        tools["explode"].run({"reason": "on purpose"})


def test_mcp_call_timeout(mcp_server):
    tools = {t.name: t for t in mcp_server.tools()}
    mcp_server.timeout_s = 0.3
    try:
        with pytest.raises(ToolFailure, match="timed out"):
            tools["wait"].run({"seconds": 3})
    finally:
        mcp_server.timeout_s = 10
    assert tools["wait"].run({"seconds": 0}).text == "done"  # the session outlives a timed-out call


def test_mcp_close_ends_the_server_process():
    server = connect_mcp(MCP_SERVER)
    pid = int(next(t for t in server.tools() if t.name == "pid").run({}).text)
    assert _alive(pid)
    server.close()
    assert not _alive(pid)
    server.close()  # a second close does nothing
    with pytest.raises(ToolFailure, match="closed"):
        server.tools()[0].run({"term": "x"})


def test_mcp_streamable_http():
    port = free_port()
    process = subprocess.Popen([sys.executable, MCP_SCRIPT, "--http", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        server = connect_mcp(f"http://127.0.0.1:{port}/mcp", timeout_s=10)
        lookup = next(t for t in server.tools() if t.name == "lookup")
        assert lookup.run({"term": "jostedalsbreen"}).text.startswith("Jostedalsbreen is")
        server.close()
    finally:
        process.terminate()
        process.wait(10)


def _wait_listening(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("spec, message", [
    ("no-such-command-xyz --flag", "'no-such-command-xyz' was not found"),
    (f"{MCP_SERVER} --no-tools", "offers no tools"),
    (f"{sys.executable} -c 'print(1)'", "could not connect"),
    (f"http://127.0.0.1:{free_port()}/mcp", "could not connect"),
    ("", "empty"),
])
def test_mcp_connect_errors(spec, message):
    with pytest.raises(ToolConfigError, match=message) as error:
        connect_mcp(spec, timeout_s=10)
    if spec:
        assert repr(spec) in str(error.value)


# --- the tools together -------------------------------------------------------------------------


def test_toolset_with_the_real_tools(corpus_path, site, mcp_server):
    corpus = LocalCorpus(corpus_path)
    lookup = next(t for t in mcp_server.tools() if t.name == "lookup")
    tools = Toolset([SearchTool(corpus), VisitTool(corpus, timeout_s=0.5, max_bytes=50_000), lookup])
    names = [d["function"]["name"] for d in tools.definitions()]
    assert names == ["search", "visit", "lookup"]
    schema = tools.call_schema()
    assert [c["properties"]["name"]["const"] for c in schema["anyOf"]] == names
    assert schema["anyOf"][2]["properties"]["arguments"]["required"] == ["term"]
    assert tools.call("search", {"query": ["glacier"]}).ok
    assert tools.call("visit", {"url": "corpus://d1", "goal": "size"}).ok
    assert tools.call("lookup", {"term": "Jostedalsbreen"}).ok
    tools.close()


def test_every_failure_is_an_observation(corpus_path, site, mcp_server):
    """Every failure mode, through Toolset.call, is an observation that says so (ok=False)."""
    corpus = LocalCorpus(corpus_path)
    by_name = {t.name: t for t in mcp_server.tools()}
    tools = Toolset([SearchTool(corpus), VisitTool(corpus, timeout_s=0.5, max_bytes=50_000),
                     by_name["explode"], _Named("searx", SearchTool(SearXNG(site)))])
    calls = [("search", {"query": ["zebra"]}), ("search", {"query": 5}), ("search", "not a dict"),
             ("searx", {"query": ["boom"]}), ("explode", {"reason": "r"}), ("nope", {}),
             *[("visit", {"url": site + p, "goal": "g"}) for p in
               ("/missing", "/broken", "/slow", "/redirect/9", "/paper.pdf", "/big", "/empty")],
             ("visit", {"url": "ftp://x", "goal": "g"}), ("visit", {"goal": "g"})]
    for name, arguments in calls:
        obs = tools.call(name, arguments)
        assert isinstance(obs, Observation) and not obs.ok, (name, arguments, obs)
        assert obs.text.startswith(f"[{name}] ") and len(obs.text) > len(name) + 10
    tools.close()


class _Named(Tool):
    """A tool under another name, so two search tools can share a toolset."""

    def __init__(self, name: str, tool: Tool):
        self.name, self.tool = name, tool
        self.description, self.parameters = tool.description, tool.parameters

    def run(self, arguments: dict) -> Observation:
        return self.tool.run(arguments)

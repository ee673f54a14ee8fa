"""The research agent's `search` tool and the engines behind it.

One tool, several backends, so the same agent runs offline on a fixed corpus (BrowseComp-Plus's
layout, scored with BM25: reproducible, no network, no key) or on the live web (a SearXNG
instance, the keyless `ddgs` metasearch, or Serper's Google results with a key). The tool's
arguments and its observation text follow Tongyi DeepResearch's `search` tool, the format its
model was trained on: a batch of queries, a numbered Markdown list of results per query, the
queries' sections joined by `=======`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bm25s
import ddgs
import httpx
from bm25s.stopwords import STOPWORDS_EN
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from sgl_merge.research.tools import Observation, Tool, ToolConfigError, ToolFailure

# Seconds one search request may take: a search engine that answers slower than this is down for
# the agent's purposes, and the agent can try again.
SEARCH_TIMEOUT_S = 20.0
# Characters of a result's snippet: enough for the model to judge whether to visit the page.
SNIPPET_CHARS = 300
# Queries one call may batch (the schema's maxItems): more would flood one observation.
MAX_QUERIES = 5
# Joins the sections of a batched call's queries (and of a multi-URL visit), as Tongyi's tools do.
SECTION_SEPARATOR = "\n=======\n"
# Where the command line keeps a corpus's BM25 index between runs (`--index-cache`).
DEFAULT_INDEX_CACHE = Path.home() / ".cache" / "sgl-merge" / "bm25"
# Part of a saved index's name: raise it when what is indexed changes (a document's indexed text,
# the tokenizer's settings), so that no index of the old kind is read.
INDEX_FORMAT = 1

logger = logging.getLogger("sgl_merge")


@dataclass
class Hit:
    """One search result: what the model sees of it, and the corpus document behind it if any."""

    title: str
    url: str
    snippet: str
    docid: str | None = None


class SearchBackend:
    """A search engine: `search(query, k)` gives at most k hits, best first, and an empty list
    when nothing matches; an engine that cannot answer raises `ToolFailure`."""

    def search(self, query: str, k: int) -> list[Hit]:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of HTTP connections."""


# --- the local corpus -----------------------------------------------------------------------------


@dataclass
class _Document:
    docid: str
    title: str
    url: str
    text: str


class LocalCorpus(SearchBackend):
    """A fixed document collection searched with BM25 (the `bm25s` package), in BrowseComp-Plus's
    JSONL layout: one JSON object a line with `docid`, `text`, and `url` and/or `title`.

    The documents stay in memory so the visit tool can read a result's full text offline
    (`document`). A document without a URL gets `corpus://<docid>`, stable across runs so answers
    can cite it.

    Indexing takes a while for a large corpus (about 22 s for 20,000 documents of 1,000 words on
    one CPU core; BrowseComp-Plus has 100,195 longer ones), so with `index_cache` (a folder) the
    index is saved there, under the corpus file's SHA-256, the bm25s version and `INDEX_FORMAT`,
    and read back by later runs over the same bytes instead of being rebuilt. `index_path` is
    where it is (None without a cache); `index_loaded` whether it was read from there."""

    def __init__(self, path: str | os.PathLike, index_cache: str | os.PathLike | None = None):
        self.path = Path(path)
        self.documents, digest = _load_corpus(self.path)
        self._by_key = {d.url: d for d in self.documents} | {d.docid: d for d in self.documents}
        self.index_path = (None if index_cache is None else
                           Path(index_cache) / f"{digest}-bm25s-{bm25s.__version__}-v{INDEX_FORMAT}")
        self.index_loaded = self._load_index()
        if not self.index_loaded:
            self._tokenizer, self._index = _tokenizer(), bm25s.BM25()
            # As a Tokenized (ids with their string vocabulary): the index then keys its vocabulary
            # by word, which is what bm25s can save.
            tokens = self._tokenizer.tokenize([f"{d.title}\n{d.text}" for d in self.documents], show_progress=False,
                                              return_as="tuple")
            self._index.index(tokens, show_progress=False)
            self._save_index()

    def _load_index(self) -> bool:
        """Take the saved index and its tokenizer vocabulary, where `index_path` holds a readable one
        of this corpus."""
        if self.index_path is None or not self.index_path.is_dir():
            return False
        tokenizer = _tokenizer()
        try:
            index = bm25s.BM25.load(str(self.index_path), show_progress=False)
            tokenizer.load_vocab(str(self.index_path))
        except (OSError, ValueError, KeyError) as e:  # unreadable or torn: built again, and saved over
            logger.warning("sgl-merge: the saved BM25 index %s cannot be read (%s); indexing %s again",
                           self.index_path, e, self.path)
            return False
        if index.scores.get("num_docs") != len(self.documents):
            logger.warning("sgl-merge: the saved BM25 index %s does not fit %s; indexing it again",
                           self.index_path, self.path)
            return False
        self._tokenizer, self._index = tokenizer, index
        return True

    def _save_index(self) -> None:
        """Save the index where `index_path` says, whole or not at all (written beside it, then
        renamed), so a run that stops midway or a concurrent one never leaves half an index. A cache
        that cannot be written costs only the next run's indexing: a warning."""
        if self.index_path is None:
            return
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=self.index_path.parent))
            try:
                self._index.save(str(staging), show_progress=False)
                self._tokenizer.save_vocab(str(staging))
                shutil.rmtree(self.index_path, ignore_errors=True)
                os.replace(staging, self.index_path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as e:
            logger.warning("sgl-merge: could not save the BM25 index of %s in %s (%s); the next run indexes it "
                           "again", self.path, self.index_path, e)

    def search(self, query: str, k: int) -> list[Hit]:
        tokens = self._tokenizer.tokenize([query], update_vocab=False, show_progress=False, return_as="tuple")
        ids, scores = self._index.retrieve(tokens, k=min(k, len(self.documents)), show_progress=False)
        terms = _terms(query)
        # A document that shares no term with the query scores 0: not a result.
        return [self._hit(self.documents[i], terms) for i, s in zip(ids[0], scores[0]) if s > 0]

    def document(self, url_or_docid: str) -> tuple[str, str, str] | None:
        """The `(title, url, text)` of the document with this URL or docid, None if none has it."""
        doc = self._by_key.get(url_or_docid) or self._by_key.get(url_or_docid.removeprefix("corpus://"))
        return None if doc is None else (doc.title, doc.url, doc.text)

    @staticmethod
    def _hit(doc: _Document, terms: set[str]) -> Hit:
        return Hit(doc.title, doc.url, _snippet(doc.text, terms), doc.docid)


def _tokenizer() -> bm25s.tokenization.Tokenizer:
    """The corpus's and its queries' tokenizer (part of what `INDEX_FORMAT` numbers)."""
    return bm25s.tokenization.Tokenizer(stopwords="en")


def _load_corpus(path: Path) -> tuple[list[_Document], str]:
    """The corpus's documents, and the SHA-256 of its bytes (what names its saved index)."""
    if not path.is_file():
        raise ToolConfigError(f"the corpus {path} does not exist; pass a JSONL file with one document a line "
                              '({"docid": ..., "text": ..., "url" or "title": ...})')
    documents, seen, digest = [], set(), hashlib.sha256()
    with path.open("rb") as f:  # json.loads decodes each line, so a line that is not UTF-8 is named too
        for number, line in enumerate(f, start=1):
            digest.update(line)
            if line.strip():
                doc = _parse_document(path, number, line)
                if doc.docid in seen:
                    raise ToolConfigError(f"{path} line {number}: docid {doc.docid!r} appears twice; "
                                          "give each document its own docid")
                seen.add(doc.docid)
                documents.append(doc)
    if not documents:
        raise ToolConfigError(f"the corpus {path} has no documents; it needs one JSON object a line")
    return documents, digest.hexdigest()


def _parse_document(path: Path, number: int, line: bytes) -> _Document:
    try:
        record = json.loads(line)
    except ValueError as e:  # not JSON, or not text
        raise ToolConfigError(f"{path} line {number} is not JSON ({getattr(e, 'msg', e)}); each line must be one "
                              "document object") from None
    if not isinstance(record, dict):
        raise ToolConfigError(f"{path} line {number} is not a JSON object; each line must be one document object")
    for key in ("docid", "text"):
        if record.get(key) in (None, ""):
            raise ToolConfigError(f"{path} line {number} has no {key!r}; every document needs a docid and a text")
    if not isinstance(record["text"], str):
        raise ToolConfigError(f"{path} line {number}: 'text' is not a string")
    docid, text = str(record["docid"]), record["text"]
    title = str(record.get("title") or _first_line(text) or docid)
    return _Document(docid, title, str(record.get("url") or f"corpus://{docid}"), text)


def _first_line(text: str) -> str:
    return _clip(next((line.strip() for line in text.splitlines() if line.strip()), ""), 100)


def _terms(text: str) -> set[str]:
    return set(re.findall(r"\w\w+", text.lower())) - set(STOPWORDS_EN)


def _snippet(text: str, terms: set[str]) -> str:
    """The sentence sharing the most terms with the query (the first on a tie), else the start of
    the text: the part of the document that says why it matched."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    best = max(sentences, key=lambda s: len(terms & _terms(s)), default="")
    return _clip(best if terms & _terms(best) else text, SNIPPET_CHARS)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


# --- web backends ---------------------------------------------------------------------------------


class _HttpBackend(SearchBackend):
    """A search engine behind an HTTP JSON API; `label` names it in failure messages."""

    label = "the search engine"

    def __init__(self):
        self._client = httpx.Client(timeout=SEARCH_TIMEOUT_S, follow_redirects=True)

    def close(self) -> None:
        self._client.close()

    def _json(self, method: str, url: str, **kwargs) -> dict:
        """The engine's JSON answer; every way the request can go wrong is a `ToolFailure` that says
        what the agent can do about it."""
        try:
            response = self._client.request(method, url, **kwargs)
            response.raise_for_status()
            return response.json()
        except httpx.TimeoutException:
            raise ToolFailure(f"{self.label} timed out; try again or a shorter query") from None
        except httpx.HTTPStatusError as e:
            raise ToolFailure(self._status_message(e.response)) from None
        except httpx.HTTPError as e:
            raise ToolFailure(f"{self.label} could not be reached ({e}); try again later") from None
        except ValueError:
            raise ToolFailure(f"{self.label} did not answer JSON; try again later") from None

    def _status_message(self, response: httpx.Response) -> str:
        return f"{self.label} answered HTTP {response.status_code}; try again later"


class SearXNG(_HttpBackend):
    """A SearXNG instance's JSON API (`/search?q=...&format=json`): keyless web search that one can
    host oneself."""

    label = "SearXNG"

    def __init__(self, base_url: str):
        if not re.match(r"https?://", base_url or ""):
            raise ToolConfigError(f"the SearXNG URL {base_url!r} is not an http(s) URL; pass e.g. "
                                  "--searxng-url http://localhost:8888")
        super().__init__()
        self.base_url = base_url.rstrip("/")

    def search(self, query: str, k: int) -> list[Hit]:
        answer = self._json("GET", f"{self.base_url}/search", params={"q": query, "format": "json"})
        return [Hit(r.get("title") or r["url"], r["url"], _clip(r.get("content") or "", SNIPPET_CHARS))
                for r in answer.get("results", []) if r.get("url")][:k]

    def _status_message(self, response: httpx.Response) -> str:
        if response.status_code == 403:
            return ("SearXNG refused the JSON API (HTTP 403): add `json` to `search.formats` in the instance's "
                    "settings.yml")
        return super()._status_message(response)


class Serper(_HttpBackend):
    """Google results through serper.dev (a paid key), the engine Tongyi DeepResearch used."""

    label = "Serper"
    # The API's address; an attribute so a test can point it at a loopback server.
    endpoint = "https://google.serper.dev/search"

    def __init__(self, api_key: str | None = None, *, endpoint: str | None = None):
        api_key = api_key or os.environ.get("SERPER_API_KEY")
        if not api_key:
            raise ToolConfigError("Serper search needs an API key: set SERPER_API_KEY or pass --serper-key "
                                  "(or use --search ddgs or searxng, which need none)")
        super().__init__()
        self._headers = {"X-API-KEY": api_key, "Content-Type": "application/json"}
        self.endpoint = endpoint or self.endpoint

    def search(self, query: str, k: int) -> list[Hit]:
        answer = self._json("POST", self.endpoint, headers=self._headers, json={"q": query, "num": k})
        return [Hit(r.get("title") or r["link"], r["link"], _clip(r.get("snippet") or "", SNIPPET_CHARS))
                for r in answer.get("organic", []) if r.get("link")][:k]

    def _status_message(self, response: httpx.Response) -> str:
        if response.status_code in (401, 403):
            return "Serper refused the API key (HTTP %d); check SERPER_API_KEY" % response.status_code
        return super()._status_message(response)


class DDGS(SearchBackend):
    """Keyless web search through the `ddgs` metasearch package (DuckDuckGo, Bing, Brave, ...):
    live results without a key or a server of one's own, at the price of rate limits."""

    def __init__(self):
        self._engine = ddgs.DDGS(timeout=int(SEARCH_TIMEOUT_S))

    def search(self, query: str, k: int) -> list[Hit]:
        try:
            results = self._engine.text(query, max_results=k)
        except TimeoutException:
            raise ToolFailure("the web search timed out; try again or a shorter query") from None
        except RatelimitException:
            raise ToolFailure("the web search is rate limited; wait a little and try again") from None
        except DDGSException as e:
            # ddgs reports an answer with no results as an error of its own.
            if str(e) == "No results found.":
                return []
            raise ToolFailure(f"the web search failed ({e}); try again later") from None
        return [Hit(r.get("title") or r["href"], r["href"], _clip(r.get("body") or "", SNIPPET_CHARS))
                for r in results if r.get("href")][:k]


BACKENDS = ("local", "searxng", "ddgs", "serper")


def make_backend(kind: str, *, corpus: str | os.PathLike | LocalCorpus | None = None,
                 searxng_url: str | None = None, serper_key: str | None = None,
                 index_cache: str | os.PathLike | None = None) -> SearchBackend:
    """The backend a command line names: `local` (needs `corpus`, a path or a loaded LocalCorpus;
    its index saved in `index_cache` where given), `searxng` (needs `searxng_url`), `ddgs`, or
    `serper` (`serper_key`, else $SERPER_API_KEY)."""
    if kind == "local":
        if corpus is None:
            raise ToolConfigError("--search local needs a corpus: pass --corpus PATH.jsonl")
        return corpus if isinstance(corpus, LocalCorpus) else LocalCorpus(corpus, index_cache)
    if kind == "searxng":
        if not searxng_url:
            raise ToolConfigError("--search searxng needs the instance's address: pass --searxng-url URL")
        return SearXNG(searxng_url)
    if kind == "ddgs":
        return DDGS()
    if kind == "serper":
        return Serper(serper_key)
    raise ToolConfigError(f"unknown search backend {kind!r}; choose one of {', '.join(BACKENDS)}")


# --- the tool -------------------------------------------------------------------------------------


class SearchTool(Tool):
    """Tongyi DeepResearch's `search`: a batch of queries in one call, the top results of each."""

    name = "search"

    def __init__(self, backend: SearchBackend, top_k: int = 5):
        if top_k < 1:
            raise ToolConfigError(f"top_k is {top_k}; a search must return at least 1 result")
        self.backend = backend
        self.top_k = top_k
        self.description = (f"Performs batched web searches: supply an array 'query'; the tool retrieves the top "
                            f"{top_k} results (title, URL, snippet) for each query in one call.")
        self.parameters = {
            "type": "object",
            "properties": {"query": {
                "type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_QUERIES,
                "description": "Array of query strings. Include multiple complementary search queries in a "
                               "single call."}},
            "required": ["query"]}

    def run(self, arguments: dict) -> Observation:
        sections, sources, found = [], [], False
        for query in _queries(arguments):
            try:
                hits = self.backend.search(query, self.top_k)
            except ToolFailure as e:
                hits, text = [], f"The search for '{query}' failed: {e}"
            else:
                text = _format_hits(query, hits)
            found = found or bool(hits)
            sections.append(text)
            sources += [h.url for h in hits if h.url not in sources]
        if not found:
            raise ToolFailure(SECTION_SEPARATOR.join(sections))
        return Observation(SECTION_SEPARATOR.join(sections), sources)

    def close(self) -> None:
        self.backend.close()


def _queries(arguments: dict) -> list[str]:
    """The call's queries: a list of strings (a single string is one query), none empty."""
    query = arguments.get("query")
    queries = [query] if isinstance(query, str) else query
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ToolFailure('search needs "query": an array of query strings, e.g. {"query": ["first", "second"]}')
    queries = [q.strip() for q in queries if q.strip()]
    if not queries:
        raise ToolFailure('every query was empty; give "query" at least one non-empty string')
    if len(queries) > MAX_QUERIES:
        raise ToolFailure(f"{len(queries)} queries in one call; give at most {MAX_QUERIES}")
    return queries


def _format_hits(query: str, hits: list[Hit]) -> str:
    if not hits:
        return f"No results found for '{query}'. Try a more general query."
    lines = [f"{i}. [{h.title}]({h.url})" + (f"\n{h.snippet}" if h.snippet else "") for i, h in enumerate(hits, 1)]
    return f"A search for '{query}' found {len(hits)} results:\n\n## Web Results\n" + "\n\n".join(lines)

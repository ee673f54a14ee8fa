"""The research agent's `visit` tool: read page(s) and give back their main text.

A corpus document is read from memory (offline runs stay offline); a web page is fetched with
bounded time, size and redirects, and only its main text (trafilatura's extraction) reaches the
model: never raw HTML, never a PDF's bytes, never a navigation bar. The arguments and the
observation text follow Tongyi DeepResearch's `visit` tool (URLs and a goal); where Tongyi has an
LLM summarise each page for the goal, `extract` plugs in such a summariser, and without one the
page text itself is the answer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlparse

import httpx
import trafilatura

from sgl_merge.research.search import SECTION_SEPARATOR, LocalCorpus
from sgl_merge.research.tools import Observation, Tool, ToolConfigError, ToolFailure

# The content types that are web pages; anything else (PDF, images, archives) is not read.
PAGE_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
# Some sites refuse clients without a browser-like user agent.
USER_AGENT = "Mozilla/5.0 (compatible; sgl-merge-research/1.0)"


class VisitTool(Tool):
    """Tongyi DeepResearch's `visit`: read one or more URLs for a goal.

    Each URL gives its text, truncated to `max_chars`, or, with `extract` (a callable
    `(goal, text) -> str`, e.g. an LLM summariser), what `extract` makes of it. A URL that cannot be
    read says why in its place; only when no URL could be read does the call fail."""

    name = "visit"
    parameters = {
        "type": "object",
        "properties": {
            "url": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                    "description": "The URL(s) of the webpage(s) to visit. Can be a single URL or an array of URLs."},
            "goal": {"type": "string", "description": "The specific information goal for visiting webpage(s)."}},
        "required": ["url", "goal"]}

    def __init__(self, corpus: LocalCorpus | None = None, *, timeout_s: float = 15, max_bytes: int = 2_000_000,
                 max_redirects: int = 5, max_chars: int = 6000, extract: Callable[[str, str], str] | None = None,
                 cache_pages: int = 128):
        for option, value in (("timeout_s", timeout_s), ("max_bytes", max_bytes), ("max_chars", max_chars)):
            if value <= 0:
                raise ToolConfigError(f"visit's {option} is {value}; it must be positive")
        if max_redirects < 0:
            raise ToolConfigError(f"visit's max_redirects is {max_redirects}; give 0 or more")
        self.corpus = corpus
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_chars = max_chars
        self.extract = extract
        self.description = ("Visit webpage(s) and return the summary of the content." if extract else
                            "Visit webpage(s) and return their main text.")
        self._pages = _PageCache(cache_pages)
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=max_redirects,
                                    headers={"User-Agent": USER_AGENT})

    def run(self, arguments: dict) -> Observation:
        urls, goal = _arguments(arguments)
        sections, sources = [], []
        for url in urls:
            try:
                text = self._read(url, goal)
            except ToolFailure as e:
                sections.append(f"Could not read {url}: {e}")
            else:
                sources.append(url)
                sections.append(f'The useful information in {url} for goal "{goal}":\n\n{text}')
        if not sources:
            raise ToolFailure(SECTION_SEPARATOR.join(sections))
        return Observation(SECTION_SEPARATOR.join(sections), sources)

    def close(self) -> None:
        self._client.close()

    def _read(self, url: str, goal: str) -> str:
        """The URL's text for the goal: truncated, then through `extract` if there is one."""
        text = self._text(url)
        if len(text) > self.max_chars:
            text = text[:self.max_chars] + f"\n[... {len(text) - self.max_chars} more characters not shown]"
        return self.extract(goal, text) if self.extract else text

    def _text(self, url: str) -> str:
        """The full main text of a corpus document or a web page."""
        document = self.corpus.document(url) if self.corpus else None
        if document is not None:
            title, _, text = document
            return f"{title}\n\n{text}"
        if not _is_web_url(url):
            raise ToolFailure("it is not an http(s) URL" + (" nor a document of the corpus" if self.corpus else ""))
        text = self._pages.get(url)
        if text is None:
            text = self._fetch(url)
            self._pages.put(url, text)
        return text

    def _fetch(self, url: str) -> str:
        try:
            with self._client.stream("GET", url) as response:
                kind = _check_response(response, self.max_bytes)
                body = self._body(response)
        except httpx.TimeoutException:
            raise ToolFailure(f"it timed out after {self.timeout_s:g} s; try again or another source") from None
        except httpx.TooManyRedirects:
            raise ToolFailure(f"it redirected more than {self._client.max_redirects} times") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise ToolFailure(f"it could not be reached ({e})") from None
        return _page_text(body, kind, response, url)

    def _body(self, response: httpx.Response) -> bytes:
        """The body, read until `max_bytes` or the time limit (the client's timeout bounds each read,
        not a page that trickles in)."""
        deadline, chunks, size = time.monotonic() + self.timeout_s, [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ToolFailure(f"it is larger than {self.max_bytes} bytes, too large to read")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the page took too long", request=response.request)
            chunks.append(chunk)
        return b"".join(chunks)


def _arguments(arguments: dict) -> tuple[list[str], str]:
    """The call's URLs (a single string is one URL) and goal."""
    url, goal = arguments.get("url"), arguments.get("goal")
    urls = [url] if isinstance(url, str) else url
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u.strip() for u in urls):
        raise ToolFailure('visit needs "url": an array of URLs, e.g. {"url": ["https://..."], "goal": "..."}')
    if not isinstance(goal, str) or not goal.strip():
        raise ToolFailure('visit needs "goal": what you are looking for on the page(s)')
    return [u.strip() for u in urls], goal.strip()


def _is_web_url(url: str) -> bool:
    try:
        parts = urlparse(url)
    except ValueError:  # e.g. an unclosed [IPv6] host
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check_response(response: httpx.Response, max_bytes: int) -> str:
    """The page's content type, once its status, type and announced size allow reading it."""
    if response.status_code >= 400:
        raise ToolFailure(f"the server answered HTTP {response.status_code} {response.reason_phrase}".rstrip())
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in PAGE_TYPES:
        raise ToolFailure(f"it is {kind or 'of no stated type'}, not a web page")
    if int(response.headers.get("content-length") or 0) > max_bytes:
        raise ToolFailure(f"it is larger than {max_bytes} bytes, too large to read")
    return kind


def _page_text(body: bytes, kind: str, response: httpx.Response, url: str) -> str:
    """The page's main text: trafilatura's extraction of a page, the decoded text of a plain file."""
    if kind == "text/plain":
        text = body.decode(response.encoding or "utf-8", errors="replace")
    else:
        text = trafilatura.extract(body, url=url, include_comments=False, include_tables=True) or ""
    if not text.strip():
        raise ToolFailure("the page has no readable text; try another source")
    return text.strip()


class _PageCache:
    """The last pages read, by URL: an agent often revisits a page, for another goal."""

    def __init__(self, size: int):
        self.size = size
        self._pages: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> str | None:
        with self._lock:
            if url in self._pages:
                self._pages.move_to_end(url)
            return self._pages.get(url)

    def put(self, url: str, text: str) -> None:
        with self._lock:
            self._pages[url] = text
            self._pages.move_to_end(url)
            while len(self._pages) > self.size:
                self._pages.popitem(last=False)

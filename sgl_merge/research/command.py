"""`sgl-merge research "QUESTION"`: one research run with live progress, the answer with its
sources, and `trace.json`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests

from sgl_merge.frontend.merge import MergeError, ServerClient
from sgl_merge.research.agent import SYSTEM_PROMPT, AgentConfig, ResearchAgent, Trace
from sgl_merge.research.chat_agent import CHAT_SYSTEM_PROMPT, ChatResearchAgent
from sgl_merge.research.extract import GoalExtractor
from sgl_merge.research.mcp_tools import connect_mcp
from sgl_merge.research.search import BACKENDS, DEFAULT_INDEX_CACHE, SearchTool, make_backend
from sgl_merge.research.tools import ToolConfigError, Toolset
from sgl_merge.research.visit import VisitTool
from sgl_merge.contract.merge import MODES

DESCRIPTION = """\
Research QUESTION with a merged agent: at every step K branches think on their own, then call a
tool (search, visit, or any MCP server's tools) as one merged call, read its result together, and
finally answer as one. Prints each step as it happens, then the answer and the sources it read, and
writes every step (the merged call, each branch's thinking, the observation, token counts) to
OUT/trace.json. --layout tongyi (default): the Qwen / Tongyi-DeepResearch tool layout (<think>,
<tool_call>, <tool_response>, <answer>), merged calls constrained to the tools' JSON schema; --layout
chat: any thinking chat model with tool calling, through its own chat template and the server's
--tool-call-parser (the OpenAI route's think_merge field)."""

EPILOG = """\
examples:
  sgl-merge research "Where was the founder of Belor born?" --url http://127.0.0.1:30000 \\
      --search local --corpus corpus.jsonl --k 4
  sgl-merge research "Who won the 2024 Abel prize?" --url URL --search searxng \\
      --searxng-url http://127.0.0.1:8888
  sgl-merge research "..." --url URL --search mcp --mcp "python browsecomp_mcp_server.py"

search backends: local (a JSONL corpus: docid, title/url, text; BM25), searxng (a SearXNG instance's
JSON API), ddgs (keyless web metasearch), serper (Google through serper.dev; SERPER_API_KEY), mcp
(the --mcp servers' own search tools, e.g. BrowseComp-Plus's searcher), none (no search tool).
visit reads corpus pages offline and other URLs over HTTP (main text only), unless --no-visit."""


def build_toolset(search: str = "local", *, corpus: str | None = None, searxng_url: str | None = None,
                  serper_key: str | None = None, mcp: list[str] = (), visit: bool = True, top_k: int = 5,
                  page_chars: int = 6000, extract=None, index_cache: str | os.PathLike | None = None) -> Toolset:
    """The agent's tools as a command line names them (`extract`: visit's goal-directed reader,
    e.g. a GoalExtractor; `index_cache`: where a local corpus's BM25 index is kept between runs); a
    configuration that cannot work raises ToolConfigError before the first step."""
    tools = []
    backend = None
    if search == "mcp" and not mcp:
        raise ToolConfigError("--search mcp takes its search tool from MCP servers: add --mcp SPEC")
    if search not in ("mcp", "none"):
        backend = make_backend(search, corpus=corpus, searxng_url=searxng_url, serper_key=serper_key,
                               index_cache=index_cache)
        tools.append(SearchTool(backend, top_k=top_k))
    if visit:
        tools.append(VisitTool(backend if search == "local" else None, max_chars=page_chars, extract=extract))
    servers = []
    try:
        for spec in mcp:
            servers.append(connect_mcp(spec))
            tools.extend(servers[-1].tools())
    except ToolConfigError:
        for server in servers:
            server.close()
        raise
    if not tools:
        raise ToolConfigError("no tools: choose a --search backend, keep visit, or add --mcp servers")
    return Toolset(tools)


def add_index_cache_args(p: argparse.ArgumentParser) -> None:
    """`--index-cache DIR` / `--no-index-cache`: where a local corpus's BM25 index is kept between runs
    (read with `index_cache`)."""
    p.add_argument("--index-cache", type=Path, default=DEFAULT_INDEX_CACHE, metavar="DIR",
                   help="keep the corpus's BM25 index here between runs, named by the corpus's SHA-256, so a "
                        f"later run over the same file skips indexing (default {DEFAULT_INDEX_CACHE})")
    p.add_argument("--no-index-cache", action="store_true", help="index the corpus afresh, save nothing")


def index_cache(args: argparse.Namespace) -> Path | None:
    return None if args.no_index_cache else args.index_cache


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgl-merge research", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--url", required=True, help="a server started with sgl-merge serve")
    p.add_argument("--api-key", help="the --api-key the server was started with")
    p.add_argument("--k", type=int, default=4, help="branches per step (default 4; 1: a single agent)")
    p.add_argument("--layout", choices=("tongyi", "chat"), default="tongyi",
                   help="tongyi: the Qwen/Tongyi-DeepResearch layout, driven token by token (default); chat: the "
                        "model's chat template and the server's --tool-call-parser")
    p.add_argument("--search", choices=(*BACKENDS, "mcp", "none"), default="local",
                   help="search backend (default local); mcp: search comes with the --mcp servers' tools")
    p.add_argument("--corpus", help="--search local: the JSONL corpus")
    add_index_cache_args(p)
    p.add_argument("--searxng-url", help="--search searxng: the instance, e.g. http://127.0.0.1:8888")
    p.add_argument("--serper-key", default=os.environ.get("SERPER_API_KEY"),
                   help="--search serper: the key (default $SERPER_API_KEY)")
    p.add_argument("--mcp", action="append", default=[], metavar="SPEC",
                   help="an MCP server whose tools the agent may call: an http(s):// URL (streamable HTTP) or a "
                        "command that starts a stdio server; repeatable")
    p.add_argument("--no-visit", action="store_true", help="no visit tool")
    p.add_argument("--top-k", type=int, default=5, help="search results per query (default 5)")
    p.add_argument("--page-chars", type=int, default=6000,
                   help="characters of a visited page shown, or read by --visit-extract (default 6000)")
    p.add_argument("--visit-extract", action="store_true",
                   help="Tongyi's visit: the model reads each page for the call's goal and only its extract joins "
                        "the history (one greedy request per page, up to --extract-tokens)")
    p.add_argument("--extract-tokens", type=int, default=1024, help="(default 1024)")
    p.add_argument("--max-steps", type=int, default=8, help="tool calls before the agent must answer (default 8)")
    p.add_argument("--min-calls", type=int, default=0, help="tool calls the agent must make before it may answer "
                                                              "(default 0)")
    p.add_argument("--think-tokens", type=int, default=1024, help="thinking budget per branch per step (default 1024)")
    p.add_argument("--answer-tokens", type=int, default=256, help="(default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="thinking and decisions (default 0.7)")
    p.add_argument("--mode", choices=MODES, default="logits", help="how the K rows are merged (default logits)")
    p.add_argument("--history", choices=("shared", "own"), default="shared",
                   help="shared: a step's thinking leaves the context once its call is merged, so the K branches "
                        "share one history (default); own: each branch keeps its thinking")
    p.add_argument("--system-prompt", type=Path,
                   help="a file with the system prompt (tongyi layout: {tools} and {date} are filled in); default "
                        "Tongyi DeepResearch's, or a short instruction for --layout chat")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible runs)")
    p.add_argument("--out", type=Path, default=Path("sgl-merge-research"),
                   help="folder for trace.json (default sgl-merge-research)")
    return p


def _progress(kind: str, data: dict) -> None:
    if kind == "step":
        print(f"step {data['step']}: thinking{' (must answer now)' if data['last'] else ''} ...", flush=True)
    elif kind == "decision":
        step, k = data["step"], data["k"]
        agreed = "" if step.agreed is None else f" [{step.agreed}/{k} branches agreed]"
        if step.action == "answer":
            print(f"step {step.step}: answer{agreed}", flush=True)
            return
        call = step.call if "raw" in step.call else json.dumps(step.call["arguments"], ensure_ascii=False)
        name = step.call.get("name", "invalid call")
        first = step.observation.splitlines()[0] if step.observation else ""
        print(f"step {step.step}: {name} {call}{agreed}\n    -> {first[:110]}", flush=True)


def _report(trace: Trace, path: Path) -> None:
    totals = trace.totals()
    print()
    if trace.answer is not None:
        print(f"answer: {trace.answer}")
    else:
        print(f"no answer: {trace.stopped or 'the agent ran out of steps'}")
    if trace.sources:
        print("sources:")
        for url in trace.sources:
            print(f"  {url}")
    print(f"{totals['steps']} steps, {totals['tool_calls']} tool calls, {totals['thinking_tokens']} thinking + "
          f"{totals['decision_tokens']} decision tokens generated, {totals['prefilled_tokens']} prompt tokens "
          f"prefilled ({totals['cached_tokens']} served from the cache), {trace.seconds:.1f} s")
    print(f"trace: {path}")


def research(argv: list[str]) -> int:
    p = _parser()
    args = p.parse_args(argv)
    system = SYSTEM_PROMPT if args.layout == "tongyi" else CHAT_SYSTEM_PROMPT
    if args.system_prompt:
        try:
            system = args.system_prompt.read_text()
        except OSError as e:
            p.error(f"--system-prompt: {e}")
    try:
        config = AgentConfig(k=args.k, max_steps=args.max_steps, think_tokens=args.think_tokens,
                             answer_tokens=args.answer_tokens, temperature=args.temperature, mode=args.mode,
                             history=args.history, system_prompt=system, seed=args.seed,
                             min_calls=args.min_calls)
    except ValueError as e:
        p.error(str(e).replace("AgentConfig.", "--").replace("_", "-"))
    server = ServerClient(args.url.rstrip("/"), args.api_key)
    extract = (GoalExtractor(server, max_tokens=args.extract_tokens, chat=args.layout == "chat")
               if args.visit_extract else None)
    try:
        toolset = build_toolset(args.search, corpus=args.corpus, searxng_url=args.searxng_url,
                                serper_key=args.serper_key, mcp=args.mcp, visit=not args.no_visit,
                                top_k=args.top_k, page_chars=args.page_chars, extract=extract,
                                index_cache=index_cache(args))
    except ToolConfigError as e:
        print(f"sgl-merge research: {e}", file=sys.stderr)
        return 2
    try:
        agent = (ResearchAgent if args.layout == "tongyi" else ChatResearchAgent)(server, toolset, config,
                                                                                 on_event=_progress)
        trace = agent.run(args.question)
    except (MergeError, requests.RequestException) as e:
        print(f"sgl-merge research: {e}", file=sys.stderr)
        return 1
    finally:
        toolset.close()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trace.json"
    path.write_text(json.dumps(trace.to_json(), indent=2, ensure_ascii=False))
    _report(trace, path)
    return 0 if trace.answer is not None else 1

"""Single trace, majority vote@k and ThinkMerge@k on one server, problem by problem.

For each problem (and each of `samples` repeats) n = max(k) thinking traces are generated once and
every method is read off the same traces, so the methods are compared pairwise:

- single: each trace answers on its own; the problem scores the fraction of its traces that are
  right (the expected accuracy of one trace);
- vote@k: the majority answer of the first k traces' own answers (ties: the answer seen first);
- merge@k: one merge group over the first k traces' contexts answers for all of them;
- merge-conf@k (`weighting` "confidence"): the same group, each member weighted by its trace's
  DeepConf confidence (`sgl_merge.confidence`, from one scoring request over the traces);
- merge-keep@k (`weighting` "adaptive"): a group of only the ceil(k * keep_fraction) most
  confident of the first k traces, uniformly weighted (fewer rows merged);
- parathink@k: one answer that reads the first k paths' KV, joined (`sgl_merge.runtime.join`):
  prompt, then each path, then the answer at positions after the longest path (ParaThinker's
  summary). On a ParaThinker checkpoint (the server's tokenizer has `<think1>` and `<summary>`
  tokens) the paths are its own: max(k) more paths per problem, path i from prompt + `<think{i}>`
  to `</think{i}>` (no other control token sampled inside it: `path_logit_bias`), and the summary
  starts with `<summary>`; on any other model the paths are the
  traces above (`<think>` ... `</think>`) and the answer starts with a newline, as after
  `</think>`: a join of plain traces on a model not trained for it. Each record says which
  (`parathink_layout`).

Contexts travel as exact token ids (the prompt through the server's chat template, the trace as
generated, `</think>` appended if the budget ran out), so every answer request is served from the
radix cache. Each finished problem is appended to a JSONL file at once; a rerun with the same file
skips the problems already there, so an interrupted evaluation loses at most the problems in flight.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import requests

from sgl_merge import confidence, traces as engine
from sgl_merge.contract.join import JOIN_KEY
from sgl_merge.contract.merge import KEY
from sgl_merge.contract.parathink_layout import (SUMMARY_OPEN, SUMMARY_PREFIX, THINK_CLOSE, THINK_OPEN, find_control_ids,
                                                 has_layout, summary_logit_bias)
from sgl_merge.evaluation.scoring import correct, vote_key
from sgl_merge.frontend.merge import ServerClient, api_key_message, majority

METHODS = ("single", "vote", "merge", "parathink")
# merge@k's variants: which rows to run, and the record key / row name of each.
WEIGHTINGS = {"uniform": "merge", "confidence": "merge-conf", "adaptive": "merge-keep"}
MATH_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_PROMPT = "{problem}\nWrite Python code for this task. Answer with one ```python block."


class EvalError(RuntimeError):
    """The evaluation cannot run as asked: the message says what to change."""


@dataclass
class EvalConfig:
    task: str = "math"
    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (2, 4, 8)
    samples: int = 1
    prompt: str | None = None  # format string over the problem's fields; default by task
    thinking_budget: int = 2048
    thinking_temperature: float = 0.7
    answer_tokens: int = 256
    answer_temperature: float = 0.0
    mode: str = "logits"
    weightings: tuple[str, ...] = ("uniform",)
    keep_fraction: float = 0.5
    concurrency: int = 16
    code_timeout_s: float = 10.0

    def keep(self, k: int) -> int:
        """How many of k traces merge-keep@k keeps."""
        return max(1, math.ceil(k * self.keep_fraction))

    @property
    def traces(self) -> int:
        return max(self.ks) if set(self.methods) & {"vote", "merge", "parathink"} else 1

    def prompt_for(self, problem: dict) -> str:
        template = self.prompt or (CODE_PROMPT if self.task == "code" else MATH_PROMPT)
        try:
            return template.format(**problem)
        except KeyError as e:
            raise EvalError(f"the prompt template needs field {e} but a problem has only {sorted(problem)}") from e


class Server:
    """The few server calls an evaluation makes, with the model's thinking delimiters. `api_key`: the
    server's --api-key, sent with every request (`Authorization: Bearer <key>`)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.http = ServerClient(self.url, api_key)  # the frontend's transport: the key, 429s waited out
        self.api_key = api_key
        self.open_ids = self.tokenize(THINK_OPEN)
        close = self.tokenize(THINK_CLOSE)
        if len(self.open_ids) != 1 or len(close) != 1:
            raise EvalError(f"the model at {self.url} has no single <think> / </think> tokens; "
                            "the evaluation needs a thinking model")
        self.close_id = close[0]
        self.think_prefix = self.tokenize(THINK_OPEN + "\n")
        # ParaThinker's layout, where the model has it: numbered paths, a `<summary>` after them;
        # else parathink's answer follows the plain traces as it follows </think>.
        self.controls = find_control_ids(self._single) if has_layout(self._single) else {}
        self.numbered_paths = bool(engine.numbered_paths(self.controls, 1))
        self.summary_prefix = ([self.controls[SUMMARY_OPEN]] if self.numbered_paths
                               else self.tokenize(SUMMARY_PREFIX["plain"]))

    def _single(self, text: str) -> int | None:
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def paths(self, n: int) -> list[engine.Path]:
        """A ParaThinker's paths 1..n (`<think{i}>` ... `</think{i}>`: the model writes what follows
        the opening, as in the frontend's `sgl_merge.parathink`)."""
        paths = engine.numbered_paths(self.controls, n)
        if len(paths) < n:
            raise EvalError(f"the model at {self.url} has no single </think{len(paths) + 1}> token: its ParaThinker "
                            f"layout has fewer than {n} paths; pass a smaller --k")
        return paths

    def post(self, path: str, body: dict):
        try:
            r = self.http.post(path, body, check=False)
        except requests.ConnectionError as e:
            raise EvalError(f"cannot reach the server at {self.url} ({type(e).__name__}); is it running? "
                            "Start one with sgl-merge serve, or pass --model-path") from e
        if r.status_code in (401, 403):
            raise EvalError(api_key_message(self.url, r.status_code, self.api_key, how="sgl-merge eval --api-key KEY"))
        if r.status_code != 200:
            raise EvalError(f"{path} failed with HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def prompt_ids(self, content: str) -> tuple[list[int], int]:
        """The chat-templated prompt as the server renders it, opened with `<think>`, and how many
        of its tokens that opening added (0 where the template opens it)."""
        out = self.post("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": content}],
                                                 "max_tokens": 1, "temperature": 0, "return_prompt_token_ids": True})
        ids = out["choices"][0]["prompt_token_ids"]
        return (ids, 0) if self.open_ids[0] in ids[-3:] else (ids + self.think_prefix, len(self.think_prefix))

    def generate(self, input_ids: list[list[int]], sampling: list[dict]) -> list[dict]:
        return self.post("/generate", {"input_ids": input_ids, "sampling_params": sampling})


def solve(server: Server, cfg: EvalConfig, problem: dict) -> dict:
    """One problem, one sample: the traces, each method's answer and whether it is right."""
    prompt, opener = server.prompt_ids(cfg.prompt_for(problem))
    n = cfg.traces
    inputs = [prompt] * n
    params = [engine.thinking_params(cfg.thinking_budget, cfg.thinking_temperature, [server.close_id])] * n
    numbered = "parathink" in cfg.methods and server.numbered_paths
    if numbered:  # a ParaThinker's own paths, sampled beside the traces
        bare = prompt[:len(prompt) - opener]
        paths = server.paths(max(cfg.ks))
        inputs += [bare + [path.open_id] for path in paths]
        params += [{**engine.thinking_params(cfg.thinking_budget, cfg.thinking_temperature, [path.close_id]),
                    "logit_bias": path.logit_bias} for path in paths]
    outs = server.generate(inputs, params)
    traces = outs[:n]
    contexts = [prompt + engine.closed(t["output_ids"], server.close_id) for t in traces]
    answer = {"temperature": cfg.answer_temperature, "max_new_tokens": cfg.answer_tokens}
    record: dict = {"thinking_tokens": [t["meta_info"]["completion_tokens"] for t in traces]}
    if numbered:
        path_contexts = [input_ids + engine.closed(o["output_ids"], path.close_id)
                         for input_ids, o, path in zip(inputs[n:], outs[n:], paths)]
        record["path_tokens"] = [o["meta_info"]["completion_tokens"] for o in outs[n:]]
    inputs, params = [], []
    if {"single", "vote"} & set(cfg.methods):
        inputs += contexts
        params += [answer] * n
    merge_ks = sorted(cfg.ks) if "merge" in cfg.methods else []
    if merge_ks and {"confidence", "adaptive"} & set(cfg.weightings):
        generated = [t["output_ids"] for t in traces]
        scored = server.post("/generate", confidence.scoring_request(prompt, generated))
        record["confidence"] = confidence.scored_confidences(scored, generated)
    groups = []  # (record key, k, member indices, weights)
    for weighting in cfg.weightings if merge_ks else ():
        for k in merge_ks:
            # "adaptive" is the server's keep: the most confident, uniformly weighted
            choice = engine.choose(k, "confidence" if weighting == "confidence" else "uniform",
                                   cfg.keep(k) if weighting == "adaptive" else None,
                                   record.get("confidence", [])[:k])
            groups.append((WEIGHTINGS[weighting], k, choice.kept, choice.weights))
    for _, _, members, weights in groups:
        group = uuid.uuid4().hex
        inputs += [contexts[i] for i in members]
        params += [engine.with_entry(answer, KEY, engine.member_entry(group, len(members), cfg.mode, w)) for w in weights]
    outs = server.generate(inputs, params)
    if {"single", "vote"} & set(cfg.methods):
        own, outs = outs[:n], outs[n:]
        record["answers"] = [{"text": o["text"], "tokens": o["meta_info"]["completion_tokens"],
                              "correct": correct(cfg.task, o["text"], problem, cfg.code_timeout_s)} for o in own]
        keys = [vote_key(cfg.task, a["text"]) for a in record["answers"]]
        if "vote" in cfg.methods:
            record["vote"] = {}
            for k in cfg.ks:
                winner, _ = majority(keys[:k])
                record["vote"][str(k)] = ({"answer": None, "correct": False} if winner is None else
                                          {"answer": keys[winner], "correct": record["answers"][winner]["correct"]})
    for name, k, members, _ in groups:
        leader, outs = outs[0], outs[len(members):]
        record.setdefault(name, {})[str(k)] = {
            "text": leader["text"], "tokens": leader["meta_info"]["completion_tokens"], "members": members,
            "agreement": leader["meta_info"].get("sgl_merge", {}).get("agreement"),
            "correct": correct(cfg.task, leader["text"], problem, cfg.code_timeout_s)}
    if "parathink" in cfg.methods:
        record["parathink_layout"] = "parathinker" if numbered else "plain traces"
        summary = {**answer, "logit_bias": summary_logit_bias(server.controls)} if numbered else answer
        record["parathink"] = _parathink(server, cfg, problem, path_contexts if numbered else contexts,
                                         len(prompt) - opener, summary)
    return record


def _parathink(server: Server, cfg: EvalConfig, problem: dict, contexts: list[list[int]], prompt_len: int,
               answer: dict) -> dict:
    """parathink@k for every k: the traces kept once, one join per k, then released."""
    tag = uuid.uuid4().hex[:12]
    rids = [f"eval-{tag}-{i}" for i in range(len(contexts))]
    owner = secrets.token_urlsafe(18)
    keep = engine.keep_params(owner)
    server.post("/generate", {"input_ids": contexts, "rid": rids, "sampling_params": [keep] * len(contexts)})
    try:
        ks = sorted(cfg.ks)
        params = [engine.with_entry(answer, JOIN_KEY, engine.join_entry(rids[:k], owner, prompt_len,
                                                                         release_sources=False)) for k in ks]
        outs = server.generate([server.summary_prefix] * len(ks), params)
    finally:
        server.post("/sgl_merge/release", {"rids": rids, "owner": owner})
    return {str(k): {"text": o["text"], "tokens": o["meta_info"]["completion_tokens"],
                     "correct": correct(cfg.task, o["text"], problem, cfg.code_timeout_s)} for k, o in zip(ks, outs)}


def load_problems(path: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """The dataset's problems, each checked for the fields its task needs."""
    need = ("problem", "tests") if task == "code" else ("question", "answer")
    problems = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{line_no} is not JSON: {e}") from e
            missing = [k for k in need if k not in p]
            if missing:
                raise EvalError(f"{path}:{line_no} lacks {missing}; a {task} problem needs {list(need)}")
            problems.append(p)
            if limit and len(problems) >= limit:
                break
    return problems


def done_keys(results: Path) -> set[tuple[int, int]]:
    """(problem, sample) pairs already in a results file; a torn last line (an interrupted write)
    is dropped so the problem runs again."""
    keys = set()
    if results.exists():
        lines = results.read_text().splitlines()
        good = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            keys.add((rec["problem"], rec["sample"]))
            good.append(line)
        if len(good) != len(lines):
            results.write_text("".join(g + "\n" for g in good))
    return keys


def run(url: str, problems: list[dict], cfg: EvalConfig, results: Path, progress: bool = True,
        api_key: str | None = None) -> list[dict]:
    """Evaluate every (problem, sample) not yet in `results`, appending each as it finishes; return
    all records in the file. `api_key`: the server's --api-key, where it has one."""
    server = Server(url, api_key)
    done = done_keys(results)
    todo = [(i, s) for i in range(len(problems)) for s in range(cfg.samples) if (i, s) not in done]
    return append_results(results, todo, lambda i: solve(server, cfg, problems[i]), cfg.concurrency,
                          f"resuming: {len(done)} problem runs already in {results}" if done and progress else None,
                          progress)


def append_results(results: Path, todo: list[tuple[int, int]], work, concurrency: int, resumed: str | None,
                   progress: bool = True) -> list[dict]:
    """Run `work(problem)` for every (problem, sample) in `todo`, `concurrency` at once, appending each
    record to `results` as it finishes (what resuming reads); say `resumed` first where given. Return
    all records in the file, in problem order."""
    from tqdm import tqdm

    results.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(concurrency)
    try:
        with open(results, "a") as out, tqdm(total=len(todo), desc="problems", unit="problem",
                                             disable=not progress, dynamic_ncols=True) as bar:
            if resumed:
                bar.write(resumed)
            futures = {pool.submit(work, i): (i, s) for i, s in todo}
            for future in as_completed(futures):
                i, s = futures[future]
                out.write(json.dumps({"problem": i, "sample": s, **future.result()}) + "\n")
                out.flush()
                os.fsync(out.fileno())
                bar.update()
    finally:
        # On Ctrl-C or an error: drop what has not started; what runs finishes and is discarded.
        pool.shutdown(wait=False, cancel_futures=True)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    return sorted(records, key=lambda r: (r["problem"], r["sample"]))

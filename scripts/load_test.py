"""Load test: many clients at once against one sgl-merge server, then check that nothing was lost.

Client threads send, for a bounded time and count, a mix of what users send: plain requests,
merge groups (one /generate of K members), `think_merge` and `parathink` calls on the OpenAI
route, and keep -> join -> release flows on the KV join. A share of the streams hang up part-way
(at a random event, or right when a parathink call starts its summary), and a share of the
requests are malformed. Afterwards it prints:

- requests sent, answers by class (2xx / 4xx / 5xx), hung (no answer within --request-timeout),
- diverged groups (members of one merge group that did not produce the same tokens),
- malformed requests that were not answered with a 4xx naming a field,
- kept sources and locked radix-cache tokens once the load is over (the plugin's /server_info),

and exits non-zero if anything was hung, diverged, 5xx, or left kept or locked. Loopback only: it
starts a CPU server on a small random model (or use --url for a server of yours).

    python scripts/load_test.py                        # 14 threads, 90 s
    python scripts/load_test.py --threads 4 --seconds 20 --max-requests 300
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections import Counter

import requests

from _common import parser

PROMPT = [5, 17, 33, 40, 41, 42, 43, 44]
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.problems: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def problem(self, what: str) -> None:
        with self.lock:
            self.counts["problems"] += 1
            if len(self.problems) < 20:
                self.problems.append(what)


class Client:
    def __init__(self, url: str, tally: Tally, rng: random.Random, timeout: float, hang_up: float, malformed: float):
        self.url, self.tally, self.rng, self.timeout = url, tally, rng, timeout
        self.hang_up, self.malformed = hang_up, malformed

    # ---------------------------------------------------------------- transport

    def post(self, path: str, body: dict) -> requests.Response | None:
        self.tally.add("requests")
        try:
            r = requests.post(self.url + path, json=body, timeout=self.timeout)
        except requests.Timeout:
            self.tally.add("hung")
            self.tally.problem(f"{path}: no answer within {self.timeout} s")
            return None
        self.tally.add(f"{r.status_code // 100}xx")
        if r.status_code >= 500:
            self.tally.problem(f"{path}: HTTP {r.status_code}: {r.text[:200]}")
        return r

    def stream(self, path: str, body: dict, stop_at=None) -> None:
        """A streamed call; hangs up at a random event (or where `stop_at(event)` says) when chosen."""
        self.tally.add("requests")
        hang_up = self.rng.random() < self.hang_up
        after = self.rng.randint(0, 6)
        try:
            with requests.post(self.url + path, json={**body, "stream": True}, stream=True, timeout=self.timeout) as r:
                self.tally.add(f"{r.status_code // 100}xx")
                if r.status_code >= 500:
                    self.tally.problem(f"{path} (stream): HTTP {r.status_code}")
                for n, line in enumerate(r.iter_lines(decode_unicode=True)):
                    if not line or not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: "):])
                    if hang_up and (stop_at(event) if stop_at else n >= after):
                        self.tally.add("hung up")
                        return
        except requests.Timeout:
            self.tally.add("hung")
            self.tally.problem(f"{path} (stream): no event within {self.timeout} s")

    # ---------------------------------------------------------------- what users send

    def params(self, **extra) -> dict:
        return {"temperature": self.rng.choice([0, 0.8]), "max_new_tokens": self.rng.randint(4, 24), **extra}

    def plain(self) -> None:
        body = {"input_ids": PROMPT + [self.rng.randint(50, 250)], "sampling_params": self.params()}
        if self.rng.random() < 0.5:
            self.stream("/generate", body)
        else:
            self.post("/generate", body)

    def group(self) -> None:
        k = self.rng.choice([2, 3, 4])
        merge = {"group": uuid.uuid4().hex, "size": k}
        params = self.params(ignore_eos=True, custom_params={"sgl_merge": merge})
        body = {"input_ids": [PROMPT + [60 + i] for i in range(k)], "sampling_params": [params] * k}
        r = self.post("/generate", body)
        if r is not None and r.status_code == 200:
            outs = [o["output_ids"] for o in r.json()]
            if any(o != outs[0] for o in outs):
                self.tally.add("diverged groups")
                self.tally.problem(f"merge group {merge['group']} diverged")

    def think_merge(self) -> None:
        body = {"model": "default", "messages": QUESTION, "max_tokens": 8,
                "think_merge": {"k": self.rng.choice([2, 3]), "thinking_budget": 24}}
        if self.rng.random() < 0.5:
            self.stream("/v1/chat/completions", body)
        else:
            self.post("/v1/chat/completions", body)

    def parathink(self) -> None:
        body = {"model": "default", "messages": QUESTION, "max_tokens": 8,
                "parathink": {"paths": self.rng.choice([2, 3]), "thinking_budget": 24, "thinking_temperature": 1.0}}
        # Hang up right as the paths end and the summary starts: where a path could be left kept.
        answering = lambda e: (e.get("sgl_merge") or {}).get("phase") == "answering"  # noqa: E731
        self.stream("/v1/chat/completions", body, stop_at=answering if self.rng.random() < 0.5 else None)

    def keep_join_release(self) -> None:
        owner, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
        rids = [f"load-{tag}-{i}" for i in range(self.rng.choice([1, 2, 3]))]
        keep = self.params(custom_params={"sgl_merge_keep": {"owner": owner, "ttl_s": 120}})
        r = self.post("/generate", {"input_ids": [PROMPT + [70 + i] for i in range(len(rids))], "rid": rids,
                                    "sampling_params": [keep] * len(rids)})
        if r is None or r.status_code != 200:
            return
        choice = self.rng.random()
        join = {"input_ids": [100, 101], "sampling_params": self.params(
            custom_params={"sgl_merge_join": {"sources": rids, "owner": owner}})}
        if choice < 0.4:
            self.post("/generate", join)  # releases them (release_sources)
        elif choice < 0.8:
            self.stream("/generate", join)  # perhaps hanging up: released all the same
            self.post("/sgl_merge/release", {"rids": rids, "owner": owner})  # a no-op if the join did
        else:
            self.post("/sgl_merge/release", {"rids": rids, "owner": owner})

    def malformed_request(self) -> None:
        body, field = self.rng.choice([
            ({"input_ids": PROMPT, "sampling_params": {"custom_params": {"sgl_merge": {"group": "g"}}}}, "sgl_merge"),
            ({"input_ids": PROMPT, "sampling_params": {"custom_params": {"sgl_merge_keep": {"ttl_s": -1}}}},
             "sgl_merge_keep"),
            ({"input_ids": PROMPT, "sampling_params": {"custom_params": {"sgl_merge_join": {"sources": []}}}},
             "sgl_merge_join"),
            ({"model": "default", "messages": QUESTION, "think_merge": {"k": 0}}, "think_merge"),
        ])
        path = "/v1/chat/completions" if "messages" in body else "/generate"
        r = self.post(path, body)
        if r is not None and not (400 <= r.status_code < 500 and field in r.text):
            self.tally.add("unclear refusals")
            self.tally.problem(f"malformed {field}: HTTP {r.status_code}: {r.text[:200]}")

    def one(self) -> None:
        if self.rng.random() < self.malformed:
            return self.malformed_request()
        self.rng.choices([self.plain, self.group, self.think_merge, self.parathink, self.keep_join_release],
                         weights=[3, 3, 2, 2, 3])[0]()


def plugin_state(url: str) -> dict:
    return requests.get(f"{url}/server_info", timeout=30).json()["internal_states"][0]["sgl_merge"]


def run(url: str, threads: int, seconds: float, max_requests: int, timeout: float, hang_up: float,
        malformed: float, seed: int) -> int:
    tally, deadline = Tally(), time.monotonic() + seconds

    def worker(i: int) -> None:
        client = Client(url, tally, random.Random(seed * 1000 + i), timeout, hang_up, malformed)
        while time.monotonic() < deadline and tally.counts["requests"] < max_requests:
            client.one()

    print(f"load: {threads} client threads for up to {seconds:g} s / {max_requests} requests against {url}", flush=True)
    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        time.sleep(5)
        print(f"  {time.monotonic() - started:5.0f} s: {tally.counts['requests']} requests", flush=True)
    elapsed = time.monotonic() - started
    # Hung-up streams and released sources settle within a few scheduler iterations.
    settle = time.monotonic() + 30
    while True:
        state = plugin_state(url)
        if (not state["kept_sources"] and not state["locked_cache_tokens"]) or time.monotonic() > settle:
            break
        time.sleep(0.5)
    c = tally.counts
    print(f"\nafter {elapsed:.0f} s: {c['requests']} requests ({c['2xx']} 2xx, {c['4xx']} 4xx, {c['5xx']} 5xx), "
          f"{c['hung up']} streams hung up by the client")
    print(f"  hung: {c['hung']}   diverged groups: {c['diverged groups']}   unclear refusals: {c['unclear refusals']}")
    print(f"  after the load: {len(state['kept_sources'])} kept sources, {state['locked_cache_tokens']} locked "
          f"cache tokens, {state['kept_budget']['reserved_tokens']} reserved")
    for problem in tally.problems:
        print("  problem:", problem)
    bad = c["hung"] or c["diverged groups"] or c["5xx"] or c["unclear refusals"] or state["kept_sources"] \
        or state["locked_cache_tokens"]
    print("load test:", "FAILED" if bad else "passed")
    return 1 if bad else 0


def main() -> None:
    p = parser(__doc__, rounds=None)
    p.add_argument("--threads", type=int, default=14)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--request-timeout", type=float, default=120, help="seconds before a request counts as hung")
    p.add_argument("--hang-up", type=float, default=0.25, help="share of streams the client abandons part-way")
    p.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from sgl_merge.server import running

    with running(args.url, args.model_path, flags=["--tool-call-parser", "qwen25"]) as url:
        sys.exit(run(url, args.threads, args.seconds, args.max_requests, args.request_timeout, args.hang_up,
                     args.malformed, args.seed))


if __name__ == "__main__":
    main()

"""Kept KV under every way a request can end, the kept-KV budget, and who may use a kept source.

One server runs one request at a time (`--max-running-requests 1`), so a request sent while a
long "blocker" decodes waits in the queue for as long as the test wants: aborts, client hang-ups,
pauses and SGLang's own waiting timeout then reach it there, deterministically. Its kept-KV budget
is small, so the budget's refusals are reached with a few short requests."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests

from conftest import TEST_SERVER_FLAGS
from sgl_merge.server import ServerProcess
from sgl_merge.testing import free_port

PROMPT = [5, 17, 33, 40, 41, 42, 43, 44]
WAITING_TIMEOUT_S = 2  # SGLang aborts a request that waited this long (SGLANG_REQ_WAITING_TIMEOUT)
MAX_KEPT_TOKENS = 400
MAX_PER_OWNER = 4


@pytest.fixture(scope="module")
def kv_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("kept-kv") / "server.log"
    srv = ServerProcess.prepare(["--model-path", str(tiny_model), "--port", str(free_port()), *TEST_SERVER_FLAGS,
                                 "--max-running-requests", "1"], log_path=str(log))
    srv.env.update(SGLANG_REQ_WAITING_TIMEOUT=str(WAITING_TIMEOUT_S), SGLANG_MERGE_KEEP_MAX_TOKENS=str(MAX_KEPT_TOKENS),
                   SGLANG_MERGE_KEEP_MAX_PER_OWNER=str(MAX_PER_OWNER))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def tag() -> str:
    return uuid.uuid4().hex[:8]


def generate(server, body, **kw):
    return requests.post(f"{server.url}/generate", json=body, timeout=120, **kw)


def keep(server, n, owner=None, steps=3, ttl_s=None):
    """n kept sources sharing PROMPT; returns (rids, owner). Without an owner the first keep gets one
    from the server, and the others are kept under it."""
    rids = []
    for i in range(n):
        entry = {k: v for k, v in (("owner", owner), ("ttl_s", ttl_s)) if v is not None} or True
        rid = f"src-{tag()}-{i}"
        r = generate(server, {"input_ids": PROMPT + [60 + i], "rid": rid, "sampling_params": {
            "temperature": 0, "max_new_tokens": steps, "ignore_eos": True, "custom_params": {"sgl_merge_keep": entry}}})
        assert r.status_code == 200, r.text
        answered = r.json()["meta_info"]["sgl_merge_keep"]
        assert owner is None or answered["owner"] == owner
        owner = answered["owner"]
        rids.append(rid)
    return rids, owner


def join_body(rids, owner, rid=None, steps=4, **fields):
    return {"input_ids": [100, 101, 102], "rid": rid or f"join-{tag()}", "sampling_params": {
        "temperature": 0, "max_new_tokens": steps, "ignore_eos": True,
        "custom_params": {"sgl_merge_join": {"sources": rids, "owner": owner, **fields}}}}


def state(server):
    return requests.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0]["sgl_merge"]


def wait_until(check, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def waiting(server) -> int:
    loads = requests.get(f"{server.url}/v1/loads", timeout=10).json()
    return sum(load["num_waiting_reqs"] for load in loads["loads"])


def released(server, rids, timeout=20.0):
    """Wait until none of `rids` is kept and nothing is locked or reserved."""
    def done():
        s = state(server)
        return (not set(rids) & set(s["kept_sources"]) and s["locked_cache_tokens"] == 0
                and s["kept_budget"]["reserved_tokens"] == 0)
    wait_until(done, f"release of {rids} (state: {state(server)})", timeout)


def abort(server, rid):
    requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=10).raise_for_status()


class Blocker:
    """A long plain request occupying the server's one running slot until the block ends."""

    def __init__(self, server):
        self.server, self.rid = server, f"blocker-{tag()}"

    def __enter__(self):
        self.thread = threading.Thread(target=generate, args=(self.server, {"input_ids": [7, 8, 9], "rid": self.rid,
                                       "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}), daemon=True)
        self.thread.start()
        wait_until(lambda: state(self.server)["locked_cache_tokens"] > 0 or requests.get(
            f"{self.server.url}/v1/loads", timeout=10).json()["loads"][0]["num_running_reqs"] > 0, "blocker running")
        return self

    def __exit__(self, *exc):
        abort(self.server, self.rid)
        self.thread.join(timeout=30)


def queued(server, body, stream=False):
    """Send `body` in a thread while the blocker runs; return once it waits in the queue."""
    before = waiting(server)
    out = {}

    def send():
        out["response"] = generate(server, {**body, "stream": stream}, stream=stream)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    wait_until(lambda: waiting(server) > before, "the request waiting in the queue")
    return thread, out


# ------------------------------------------------------------------ every way a join can end


def test_a_join_aborted_while_queued_releases_its_sources(kv_server):
    rids, owner = keep(kv_server, 2)
    with Blocker(kv_server):
        body = join_body(rids, owner)
        thread, out = queued(kv_server, body)
        abort(kv_server, body["rid"])
        thread.join(timeout=30)
        assert out["response"].json()["meta_info"]["finish_reason"]["message"] == "Abort in waiting queue"
    released(kv_server, rids)  # release_sources (the default): gone with the join


def test_a_join_that_keeps_its_sources_lets_them_expire_after_an_abort_while_queued(kv_server):
    rids, owner = keep(kv_server, 2, ttl_s=1)
    with Blocker(kv_server):
        body = join_body(rids, owner, release_sources=False)
        thread, _ = queued(kv_server, body)
        abort(kv_server, body["rid"])
        thread.join(timeout=30)
        time.sleep(1.2)
    released(kv_server, rids)  # no join holds them any more: their TTL ends them


def test_a_streamed_join_whose_client_hangs_up_while_queued_releases_its_sources(kv_server):
    rids, owner = keep(kv_server, 2)
    with Blocker(kv_server):
        with requests.post(f"{kv_server.url}/generate", json={**join_body(rids, owner), "stream": True},
                           stream=True, timeout=60) as r:
            wait_until(lambda: waiting(kv_server) > 0, "the join waiting in the queue")
            r.raw._fp.fp.raw._sock.shutdown(2)  # the client goes away
    released(kv_server, rids)


def test_a_join_aborted_while_running_releases_its_sources(kv_server):
    rids, owner = keep(kv_server, 2)
    body = join_body(rids, owner, steps=3000)
    with requests.post(f"{kv_server.url}/generate", json={**body, "stream": True}, stream=True, timeout=60) as r:
        next(r.iter_lines(decode_unicode=True))  # it is decoding
        abort(kv_server, body["rid"])
    released(kv_server, rids)


def test_a_join_retracted_then_aborted_releases_its_sources(kv_server):
    rids, owner = keep(kv_server, 2)
    body = join_body(rids, owner, steps=3000)
    with requests.post(f"{kv_server.url}/generate", json={**body, "stream": True}, stream=True, timeout=60) as r:
        lines = r.iter_lines(decode_unicode=True)
        next(lines)  # it is decoding
        requests.post(f"{kv_server.url}/pause_generation", json={"mode": "retract"}, timeout=30).raise_for_status()
        try:
            abort(kv_server, body["rid"])  # the paused scheduler still takes aborts
            wait_until(lambda: not set(rids) & set(state(kv_server)["kept_sources"]), "release while paused")
        finally:
            requests.post(f"{kv_server.url}/continue_generation", json={}, timeout=30).raise_for_status()
        last = [line for line in lines if line.startswith("data: {")][-1]
        assert json.loads(last[len("data: "):])["meta_info"]["finish_reason"]["message"] == "Abort in waiting queue"
    released(kv_server, rids)


def test_a_join_that_waits_past_sglangs_waiting_timeout_releases_its_sources(kv_server):
    rids, owner = keep(kv_server, 2)
    with Blocker(kv_server):
        thread, out = queued(kv_server, join_body(rids, owner))
        thread.join(timeout=WAITING_TIMEOUT_S + 30)
        assert out["response"].status_code == 503 and "waiting timeout" in out["response"].text
    released(kv_server, rids)


def test_a_keep_aborted_while_queued_gives_back_its_reservation(kv_server):
    with Blocker(kv_server):
        rid = f"src-{tag()}"
        thread, _ = queued(kv_server, {"input_ids": PROMPT, "rid": rid, "sampling_params": {
            "max_new_tokens": 50, "custom_params": {"sgl_merge_keep": True}}})
        assert state(kv_server)["kept_budget"]["reserved_tokens"] == len(PROMPT) + 50
        abort(kv_server, rid)
        thread.join(timeout=30)
    released(kv_server, [rid])


def test_a_keep_released_before_it_finished_is_not_kept(kv_server):
    """What a parathink call does when its client hangs up while a path's keep is on its way."""
    owner = f"owner-{tag()}"
    with Blocker(kv_server):
        rid = f"src-{tag()}"
        thread, out = queued(kv_server, {"input_ids": PROMPT, "rid": rid, "sampling_params": {
            "max_new_tokens": 0, "custom_params": {"sgl_merge_keep": {"owner": owner}}}})
        r = requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": [rid], "owner": owner}, timeout=10)
        assert r.status_code == 200, r.text
    thread.join(timeout=30)
    assert out["response"].status_code == 200  # it ran, and was not kept
    assert "sgl_merge_keep" not in out["response"].json()["meta_info"]
    released(kv_server, [rid])


# ------------------------------------------------------------------ the budget


def test_keeps_past_the_token_budget_are_429s_and_server_info_shows_the_budget(kv_server):
    budget = state(kv_server)["kept_budget"]
    assert budget["max_tokens"] == MAX_KEPT_TOKENS and budget["max_sources_per_owner"] == MAX_PER_OWNER
    r = generate(kv_server, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": MAX_KEPT_TOKENS, "custom_params": {"sgl_merge_keep": True}}})
    assert r.status_code == 429, r.text
    message = r.json()["message"]
    assert "SGLANG_MERGE_KEEP_MAX_TOKENS" in message and "/sgl_merge/release" in message
    rids, owner = keep(kv_server, 2, steps=100)  # 2 x 109 of 400 tokens
    budget = state(kv_server)["kept_budget"]
    assert budget["sources"] == 2 and 2 * 100 <= budget["tokens"] <= 2 * 110
    r = generate(kv_server, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 200, "custom_params": {"sgl_merge_keep": True}}})
    assert r.status_code == 429, r.text
    requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": rids, "owner": owner}, timeout=10)
    released(kv_server, rids)
    assert generate(kv_server, {"input_ids": PROMPT, "sampling_params": {  # room again
        "max_new_tokens": 200, "custom_params": {"sgl_merge_keep": {"ttl_s": 0.5}}}}).status_code == 200


def test_one_owner_holds_at_most_the_per_owner_limit(kv_server):
    owner = f"owner-{tag()}"
    rids, _ = keep(kv_server, MAX_PER_OWNER, owner=owner, steps=1)
    r = generate(kv_server, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"sgl_merge_keep": {"owner": owner}}}})
    assert r.status_code == 429 and "SGLANG_MERGE_KEEP_MAX_PER_OWNER" in r.text, r.text
    other, other_owner = keep(kv_server, 1, steps=1)  # another owner is not limited by it
    requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": rids, "owner": owner}, timeout=10)
    requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": other, "owner": other_owner}, timeout=10)
    released(kv_server, rids + other)


# ------------------------------------------------------------------ ownership


def test_only_the_owner_joins_or_releases_and_a_refusal_does_not_tell_whether_the_rid_exists(kv_server):
    rids, owner = keep(kv_server, 1)
    assert len(owner) >= 20  # made up by the server: unguessable
    wrong = generate(kv_server, join_body(rids, "not-the-owner"))
    missing = generate(kv_server, join_body(["no-such-rid"], "not-the-owner"))
    unowned = generate(kv_server, {"input_ids": [100], "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"sgl_merge_join": {"sources": rids}}}})
    for r in (wrong, missing, unowned):
        assert r.status_code == 400, r.text
    messages = [r.json()["error"]["message"] for r in (wrong, missing)]
    assert messages[0].replace(rids[0], "X") == messages[1].replace("no-such-rid", "X")
    assert "present the owner it was kept under" in messages[0]
    r = requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": rids, "owner": "not-the-owner"}, timeout=10)
    assert r.status_code == 200  # the same answer as for the owner...
    time.sleep(0.5)
    assert set(rids) <= set(state(kv_server)["kept_sources"])  # ...but nothing was released
    r = requests.post(f"{kv_server.url}/sgl_merge/release", json={"rids": rids}, timeout=10)
    assert r.status_code == 400 and "owner is required" in r.text
    assert generate(kv_server, join_body(rids, owner)).status_code == 200  # the owner joins, and releases
    released(kv_server, rids)


def test_a_batch_of_keeps_shares_one_owner_and_two_owners_may_keep_the_same_rid(kv_server):
    rids = [f"src-{tag()}-{i}" for i in range(2)]
    r = generate(kv_server, {"input_ids": [PROMPT + [60], PROMPT + [61]], "rid": rids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 2, "custom_params": {"sgl_merge_keep": True}}})
    assert r.status_code == 200, r.text
    owners = {out["meta_info"]["sgl_merge_keep"]["owner"] for out in r.json()}
    assert len(owners) == 1
    (owner,) = owners
    same, _ = keep(kv_server, 1, owner="someone-else")  # a rid of its own ...
    twin = {"input_ids": PROMPT + [62], "rid": rids[0], "sampling_params": {  # ... and one colliding with ours
        "temperature": 0, "max_new_tokens": 2, "custom_params": {"sgl_merge_keep": {"owner": "someone-else"}}}}
    assert generate(kv_server, twin).status_code == 200
    assert state(kv_server)["kept_sources"].count(rids[0]) == 2
    assert generate(kv_server, join_body(rids, owner)).status_code == 200
    assert generate(kv_server, join_body([rids[0]] + same, "someone-else")).status_code == 200
    released(kv_server, rids + same)

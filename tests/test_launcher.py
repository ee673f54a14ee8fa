"""The launcher's wait for a server: as long as it is told (`--wait-timeout`), saying what the server
is doing meanwhile, and at once when the server dies. A slow fake server stands in for a large
model's cold start (the real server's start is what every other end-to-end test goes through)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from sgl_merge.server import ServerProcess, ServerStartError, split_wait_timeout
from sgl_merge.testing import free_port

FAKE = textwrap.dedent('''
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port, delay, exit_code = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    start = time.time()
    while time.time() - start < delay:
        print(f"Capturing prefill shape ({int(time.time() - start)} s)", flush=True)
        time.sleep(0.5)
    if exit_code:
        print("CUDA out of memory while capturing", flush=True)
        sys.exit(exit_code)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"internal_states": [{"sgl_merge": {"active": True, "sglang_version": "0.5.23"}}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


def fake_server(tmp_path, delay: float, exit_code: int = 0) -> ServerProcess:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    port = free_port()
    return ServerProcess(argv=[str(port), str(delay), str(exit_code)], log_path=str(tmp_path / "server.log"),
                         url=f"http://127.0.0.1:{port}", command=[sys.executable, str(script)])


def test_a_slow_start_is_waited_for_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("sgl_merge.server.PROGRESS_EVERY_S", 1.0)
    heard = []
    server = fake_server(tmp_path, delay=4)
    try:
        server.start(timeout=60, progress=lambda elapsed, line: heard.append((elapsed, line)))
        assert server.status["active"]
    finally:
        server.stop()
    assert len(heard) >= 2 and all(line and line.startswith("Capturing prefill shape") for _, line in heard)


def test_the_wait_ends_at_the_timeout_naming_the_flag(tmp_path):
    server = fake_server(tmp_path, delay=600)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as e:
        server.start(timeout=3)
    assert time.monotonic() - t0 < 30
    assert "not ready after 3 s" in str(e.value) and "--wait-timeout" in str(e.value)
    assert "Capturing prefill shape" in str(e.value)  # what the server was doing
    assert server.proc is None  # stopped, not left behind


def test_a_server_that_dies_fails_the_wait_at_once_with_its_log(tmp_path):
    server = fake_server(tmp_path, delay=1, exit_code=3)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as e:
        server.start(timeout=600)
    assert time.monotonic() - t0 < 30
    assert "exited with code 3" in str(e.value) and "CUDA out of memory while capturing" in str(e.value)


def test_wait_timeout_is_taken_out_of_sglangs_arguments():
    assert split_wait_timeout(["--model-path", "m", "--wait-timeout", "90", "--port", "1"]) == (
        90.0, ["--model-path", "m", "--port", "1"])
    assert split_wait_timeout(["--wait-timeout=2.5"]) == (2.5, [])
    assert split_wait_timeout(["--model-path", "m"]) == (1800.0, ["--model-path", "m"])
    for bad in (["--wait-timeout", "soon"], ["--wait-timeout", "0"], ["--wait-timeout"]):
        with pytest.raises(ValueError, match="--wait-timeout takes a positive number of seconds"):
            split_wait_timeout(bad)


def test_serve_refuses_a_bad_wait_timeout_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "sgl_merge.cli", "serve", "--model-path", "x", "--wait-timeout",
                           "later"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--wait-timeout takes a positive number of seconds to wait for the server, got 'later'" in proc.stderr

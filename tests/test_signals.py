"""No server outlives the command that started it: `sgl-merge serve`, `demo` and `eval` stop their
server's whole process group on SIGTERM and SIGHUP as on Ctrl-C, and when the command is killed
outright (SIGKILL) Linux's parent-death signal stops the server all the same.

A fake server (a few lines of HTTP that report sgl-merge active, then hang every other request, as
a server busy with a long job would) stands in for SGLang where the test is about the command's
side; the commands run as they ship, with only `ServerProcess.prepare` pointed at the fake. One test
starts a real server, for SGLang's side: its launcher, told by Linux that `sgl-merge serve` died,
must take its scheduler and detokenizer down with it. Every check looks at the server's process
group itself (/proc), not at what the command says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from sgl_merge.testing import free_port

from conftest import TEST_SERVER_FLAGS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups read from /proc")

FAKE = textwrap.dedent('''
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, pid_file = int(sys.argv[1]), sys.argv[2]
    if sys.argv[3:] == ["stubborn"]:  # a server that does not stop on SIGTERM
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in ("/health", "/server_info"):
                return self.hang()
            body = {"internal_states": [{"sgl_merge": {"active": True, "sglang_version": "0.5.23"}}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.hang()

        def hang(self):
            time.sleep(3600)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')

# `python SHIM FAKE PORT PID_FILE COMMAND ARGS...`: the sgl-merge command line as installed, whose
# servers are the fake one (stubborn where FAKE_SERVER=stubborn).
SHIM = textwrap.dedent('''
    import os, sys
    from sgl_merge import server

    fake, port, pid_file = sys.argv[1], sys.argv[2], sys.argv[3]

    def prepare(cls, argv, log_path=None):
        return cls(argv=[port, pid_file, os.environ.get("FAKE_SERVER", "")], log_path=log_path, env=dict(os.environ),
                   url=f"http://127.0.0.1:{port}", command=[sys.executable, fake])

    server.ServerProcess.prepare = classmethod(prepare)
    from sgl_merge.cli import main
    sys.exit(main(sys.argv[4:]))
''')

READY = "SGLang server listening on"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes whose process group is `pgid`, read from /proc."""
    members = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        state, _, pgrp = stat[stat.rfind(b")") + 2:].split()[:3]
        if state != b"Z" and int(pgrp) == pgid:
            members.append(pid)
    return members


def wait_gone(pgid: int, within: float) -> list[int]:
    """[] once group `pgid` has no live process, or what is still there after `within` seconds."""
    deadline = time.monotonic() + within
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def wait_for(path, text: str, proc: subprocess.Popen, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{path.read_text()[-3000:]}"
        time.sleep(0.1)
    raise TimeoutError(f"no {text!r} after {within} s:\n{path.read_text()[-3000:]}")


class Command:
    """An sgl-merge command line (under the shim) as a child process in its own session, as a shell
    or a CI runner starts one; whatever is left of it and its fake server is killed at the end."""

    def __init__(self, tmp_path, *argv: str, env: dict[str, str] | None = None):
        (tmp_path / "fake_server.py").write_text(FAKE)
        (tmp_path / "shim.py").write_text(SHIM)
        self.pid_file, self.log = tmp_path / "server.pid", tmp_path / "command.log"
        cmd = [sys.executable, str(tmp_path / "shim.py"), str(tmp_path / "fake_server.py"), str(free_port()),
               str(self.pid_file), *argv]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def server_group(self) -> int:
        """The fake server's process group (its own session: the pgid is its pid)."""
        pgid = int(self.pid_file.read_text())
        assert group_members(pgid) == [pgid]
        return pgid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        for pgid in [self.proc.pid] + ([int(self.pid_file.read_text())] if self.pid_file.exists() else []):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _dataset(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    return data


COMMANDS = {
    "serve": lambda tmp: ["serve"],
    "demo": lambda tmp: ["demo", "--model-path", "unused", "--tasks", "chain", "--problems", "2",
                         "--concurrency", "2", "--out", str(tmp / "out")],
    "eval": lambda tmp: ["eval", "--model-path", "unused", "--dataset", str(_dataset(tmp)), "--k", "2",
                         "--concurrency", "2", "--out", str(tmp / "out")],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command,sig", [("serve", signal.SIGTERM), ("serve", signal.SIGHUP),
                                         ("demo", signal.SIGTERM), ("eval", signal.SIGHUP)])
def test_sigterm_and_sighup_stop_the_whole_server_as_ctrl_c_does(tmp_path, command, sig):
    cmd = Command(tmp_path, *COMMANDS[command](tmp_path))
    try:
        wait_for(cmd.log, READY, cmd.proc)
        pgid = cmd.server_group()
        time.sleep(0.5)  # demo / eval: at their first request, which the busy server holds
        cmd.proc.send_signal(sig)
        code = cmd.proc.wait(timeout=60)
        assert wait_gone(pgid, within=5) == [], f"server left running after {sig.name}:\n{cmd.output()}"
        out = cmd.output()
        # serve ends as on Ctrl-C (a server asked to stop stops normally); a job stopped short
        # exits 128 + the signal's number, as a shell reports a process the signal ended.
        assert code == (0 if command == "serve" else 128 + sig), out
        assert f"sgl-merge {command}: stopped by {sig.name}; its SGLang server and all the server's processes " \
               "are stopped" in out
        if command == "serve":
            assert "sgl-merge serve: stopping the server" in out
        else:
            assert f"sgl-merge {command}: interrupted;" in out  # Ctrl-C's own path: results saved
        assert "Traceback" not in out
    finally:
        cmd.cleanup()


@pytest.mark.timeout(120)
def test_a_second_signal_kills_a_server_that_is_slow_to_stop(tmp_path):
    """The first signal gives the server its grace (20 s) to stop; a second one, as an impatient
    user's second Ctrl-C or a scheduler's follow-up, SIGKILLs the server's group at once."""
    cmd = Command(tmp_path, "serve", env={"FAKE_SERVER": "stubborn"})
    try:
        wait_for(cmd.log, READY, cmd.proc)
        pgid = cmd.server_group()
        cmd.proc.send_signal(signal.SIGTERM)
        wait_for(cmd.log, "stopping the server", cmd.proc, within=30)
        time.sleep(1)
        assert group_members(pgid) == [pgid]  # still in its grace
        t0 = time.monotonic()
        cmd.proc.send_signal(signal.SIGTERM)
        cmd.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 10, "the second signal did not cut the grace short"
        assert wait_gone(pgid, within=5) == [], cmd.output()
        assert "stopped by SIGTERM; its SGLang server and all the server's processes are stopped" in cmd.output()
    finally:
        cmd.cleanup()


@pytest.mark.timeout(120)
def test_a_killed_command_takes_its_server_with_it(tmp_path):
    """SIGKILL runs no handler at all: the server's launcher gets SIGTERM from Linux instead. (For
    `sgl-merge serve` with a real server, see the last test.)"""
    cmd = Command(tmp_path, *COMMANDS["demo"](tmp_path))
    try:
        wait_for(cmd.log, READY, cmd.proc)
        pgid = cmd.server_group()
        cmd.proc.kill()
        assert cmd.proc.wait(timeout=10) == -signal.SIGKILL
        assert wait_gone(pgid, within=5) == [], f"server left running after its command's SIGKILL:\n{cmd.output()}"
    finally:
        cmd.cleanup()


@pytest.mark.timeout(60)
def test_a_signal_inherited_ignored_stays_ignored():
    """nohup's SIGHUP (and SIGINT in a background job) stay ignored; SIGTERM and the rest stop."""
    check = textwrap.dedent('''
        import signal
        from sgl_merge import cli

        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cli.install_stop_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is cli._on_stop_signal
        cli.install_stop_handlers(force_sigint=True)  # sgl-merge serve's choice
        assert signal.getsignal(signal.SIGINT) is cli._on_stop_signal
    ''')
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(120)
def test_a_server_started_in_a_thread_outlives_the_thread_not_the_process(tmp_path):
    """Linux's parent-death signal follows the forking thread: a server started from a worker thread
    must not die with that thread, and still must die with the process."""
    (tmp_path / "fake_server.py").write_text(FAKE)
    pid_file, log = tmp_path / "server.pid", tmp_path / "starter.log"
    (tmp_path / "starter.py").write_text(textwrap.dedent(f'''
        import sys, threading, time
        from sgl_merge.server import ServerProcess

        srv = ServerProcess(argv=["{free_port()}", "{pid_file}"], command=[sys.executable, "{tmp_path / 'fake_server.py'}"])
        srv.url = "http://127.0.0.1:" + srv.argv[0]
        worker = threading.Thread(target=srv.start, kwargs=dict(timeout=60))
        worker.start()
        worker.join()
        print("started", flush=True)
        time.sleep(600)
    '''))
    with open(log, "wb") as out:
        starter = subprocess.Popen([sys.executable, str(tmp_path / "starter.py")], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    pgid = None
    try:
        wait_for(log, "started", starter)
        pgid = int(pid_file.read_text())
        time.sleep(1.5)  # the starting thread is gone: a signal tied to it would have landed
        assert group_members(pgid) == [pgid], "the server died with the thread that started it"
        starter.kill()
        starter.wait(timeout=10)
        assert wait_gone(pgid, within=5) == [], "the server outlived the process that started it"
    finally:
        for group in (starter.pid, pgid):
            try:
                os.killpg(group, signal.SIGKILL) if group else None
            except ProcessLookupError:
                pass
        starter.wait()


@pytest.mark.timeout(120)
def test_serve_process_leaves_nothing_when_the_test_process_dies(tmp_path):
    """The tests' own wrapper: should the test process die inside `with ServeProcess(...)` (a
    timeout's SIGKILL, a cancelled CI job), the `sgl-merge serve` it started and that command's
    server go too."""
    (tmp_path / "fake_server.py").write_text(FAKE)
    (tmp_path / "shim.py").write_text(SHIM)
    pid_file, log = tmp_path / "server.pid", tmp_path / "test_process.log"
    command = [sys.executable, str(tmp_path / "shim.py"), str(tmp_path / "fake_server.py"), str(free_port()),
               str(pid_file), "serve"]
    (tmp_path / "test_process.py").write_text(textwrap.dedent(f'''
        import time
        from sgl_merge.testing import ServeProcess

        with ServeProcess([], log_path="{tmp_path / 'serve.log'}", timeout=60, command={command!r}) as srv:
            print("ready", srv.proc.pid, flush=True)
            time.sleep(600)
    '''))
    with open(log, "wb") as out:
        test_process = subprocess.Popen([sys.executable, str(tmp_path / "test_process.py")], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
    groups = []
    try:
        wait_for(log, "ready", test_process)
        groups = [int(log.read_text().split()[1]), int(pid_file.read_text())]  # sgl-merge serve's, the server's
        assert all(group_members(g) for g in groups)
        test_process.kill()
        test_process.wait(timeout=10)
        for g in groups:
            assert wait_gone(g, within=30) == [], (tmp_path / "serve.log").read_text()
        assert "sgl-merge serve: stopped by SIGTERM" in (tmp_path / "serve.log").read_text()
    finally:
        for g in [test_process.pid, *groups]:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        test_process.wait()


@pytest.mark.server
@pytest.mark.timeout(300)
def test_a_real_server_goes_when_sgl_merge_serve_is_killed(tiny_model, tmp_path):
    """SGLang's side of the chain, with a real server: SIGKILL on `sgl-merge serve` leaves its
    launcher to Linux's parent-death SIGTERM, on which the launcher must stop, and its scheduler and
    detokenizer (SGLang ties them to it with their own parent-death signal) with it. No fixed
    startup time is asserted; the stop is (measured: about 6 s on 2 cores)."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "sgl_merge.cli", "serve", "--model-path", str(tiny_model),
                                  "--port", str(free_port()), *TEST_SERVER_FLAGS], stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    pgid = None
    try:
        wait_for(log, READY, serve, within=240)
        [launcher] = [p for p in psutil.Process(serve.pid).children() if os.getpgid(p.pid) != serve.pid]
        pgid = os.getpgid(launcher.pid)
        assert pgid == launcher.pid  # the server in its own group
        names = [" ".join(psutil.Process(pid).cmdline()) for pid in group_members(pgid)]
        assert any("scheduler" in n for n in names) and any("detokenizer" in n for n in names), names
        serve.kill()
        serve.wait(timeout=10)
        left = wait_gone(pgid, within=60)
        assert left == [], f"left running: {[(p, psutil.Process(p).cmdline()[:3]) for p in left]}"
    finally:
        for g in (serve.pid, pgid):
            try:
                os.killpg(g, signal.SIGKILL) if g else None
            except ProcessLookupError:
                pass
        serve.wait()

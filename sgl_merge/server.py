"""Start, watch and stop an SGLang server with the sgl-merge plugin: used by `sgl-merge serve`,
`sgl-merge demo` and the test fixtures (`sgl_merge.testing.ServeProcess` runs `sgl-merge serve`
through this same `ServerProcess`).

The server runs as `python -m sglang.launch_server` in its own process group, so stopping it (or
Ctrl-C on the launcher) takes down the scheduler and detokenizer children too. Readiness means more
than /health: the scheduler process must report the plugin active, since SGLang only logs plugin
failures.

No server outlives the process that started it. `stop()` (which `running()` and the CLI's signal
handlers reach) ends its whole process group; and where the starter dies without stopping it (even
by SIGKILL), Linux's parent-death signal (PR_SET_PDEATHSIG) sends SGLang's launcher SIGTERM, as
`stop()` would: the launcher drains (requests of a client that is gone are aborted), asks its
schedulers to exit and kills what is left of its children, which SGLang itself also ties to the
launcher with a parent-death SIGKILL (measured: all gone about 6 s after the starter's SIGKILL, on 2
CPU cores). Linux sends that signal when the *thread* that forked the child ends, so a server started
from another thread than the main one is forked by a helper thread that lives as long as the
process (see `spawn`). Elsewhere than Linux only `stop()` applies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psutil
import requests

from sgl_merge import __version__
from sgl_merge.cpu import cpu_engine_env

# Settings a CPU server needs (or that keep it small and quick), each applied only when the user
# did not pass the flag. See ../shared/notes/sglang-0.5.23.md.
CPU_DEFAULT_FLAGS: list[tuple[str, str | None]] = [
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--sampling-backend", "pytorch"),
    ("--disable-overlap-schedule", None),
    ("--max-total-tokens", "20000"),
    # Without it the idle scheduler polls in a busy loop, taking a core from the clients.
    ("--sleep-on-idle", None),
]


# How long a launcher waits for the server to report ready: a cold start of a large model (download,
# weight loading, CUDA graph captures, NCCL for tensor parallelism) can take many minutes.
DEFAULT_WAIT_TIMEOUT_S = 1800.0
WAIT_FLAG = "--wait-timeout"
PROGRESS_EVERY_S = 15.0


class ServerStartError(RuntimeError):
    """The server exited or never became ready with sgl-merge active."""


# The process groups of the servers this process started and has not stopped yet (pgid: server), and
# of those it stopped: the CLI's safety net and its last word on a signal read them.
live_servers: dict[int, "ServerProcess"] = {}
stopped_groups: list[int] = []

# What a child started by `spawn` gets when its starter dies: SGLang's launcher drains and stops its
# children on SIGTERM.
PDEATHSIG = signal.SIGTERM
_PR_SET_PDEATHSIG = 1
_spawner = None
_spawner_lock = threading.Lock()


def _prctl():
    """libc's prctl on Linux (resolved here, never in a forked child), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with(parent_pid: int, prctl):
    """A preexec_fn: the child gets PDEATHSIG when its parent (thread) dies; with the signal's
    default action, even if the parent ignores, blocks or handles it, and at once if the parent died
    before the request took effect."""

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {PDEATHSIG})
        signal.signal(PDEATHSIG, signal.SIG_DFL)
        prctl(_PR_SET_PDEATHSIG, int(PDEATHSIG))
        if os.getppid() != parent_pid:
            os._exit(128 + int(PDEATHSIG))

    return preexec


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd)` in a new session (its own process group, which `stop()` ends), tied
    to this process on Linux: it gets PDEATHSIG when this process dies, however it dies. The parent
    Linux watches is the forking thread, so a call from another thread than the main one forks in a
    helper thread that lives until the interpreter exits."""
    popen_kwargs["start_new_session"] = True
    prctl = _prctl()
    if prctl is None:
        return subprocess.Popen(cmd, **popen_kwargs)
    popen_kwargs["preexec_fn"] = _die_with(os.getpid(), prctl)
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(cmd, **popen_kwargs)
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            from concurrent.futures import ThreadPoolExecutor

            _spawner = ThreadPoolExecutor(1, thread_name_prefix="sgl-merge-spawner")
    return _spawner.submit(subprocess.Popen, cmd, **popen_kwargs).result()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`. Without /proc: [pgid] if the group
    has any process left, else []."""
    if not os.path.isdir("/proc/self"):
        return [pgid] if _group_alive(pgid) else []
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group `pgid`, if any is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Stop every server this process started and has not stopped (the CLI's safety net)."""
    for server in list(live_servers.values()):
        server.stop()


def split_wait_timeout(argv: list[str]) -> tuple[float, list[str]]:
    """`--wait-timeout S` (sgl-merge's own flag, not SGLang's) taken out of `argv`: (S, the rest).
    A ValueError names the flag when S is not a positive number of seconds."""
    value, rest = None, []
    it = iter(argv)
    for arg in it:
        if arg == WAIT_FLAG:
            value = next(it, "")
        elif arg.startswith(WAIT_FLAG + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if value is None:
        return DEFAULT_WAIT_TIMEOUT_S, rest
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{WAIT_FLAG} takes a positive number of seconds to wait for the server, got {value!r}")
    return seconds, rest


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def has_flag(argv: list[str], flag: str) -> bool:
    return _flag_value(argv, flag) is not None


def wants_cpu(argv: list[str]) -> bool:
    """CPU engine when asked for (`--device cpu`) or when no GPU is present and none was named."""
    device = _flag_value(argv, "--device")
    if device is not None:
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def with_cpu_defaults(argv: list[str]) -> list[str]:
    """`argv` plus every CPU default flag the user did not set."""
    out = list(argv)
    for flag, value in CPU_DEFAULT_FLAGS:
        if not has_flag(out, flag):
            out += [flag] if value is None else [flag, value]
    return out


def parse_args(argv: list[str]):
    """Parse with SGLang's own parser (bad arguments get SGLang's message, exit 2)."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sgl-merge serve")
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def validate_args(argv: list[str]) -> tuple[str, int]:
    """Parse with SGLang's own parser; return host, port."""
    args = parse_args(argv)
    return args.host, args.port


def plugin_status(url: str, timeout: float = 5.0, api_key: str | None = None) -> dict | None:
    """The sgl-merge status the scheduler reports through /server_info, or None if absent. `api_key`:
    the server's --api-key; where the server refuses the request (HTTP 401/403), the status says so
    (active False, and an error naming the API key) rather than the plugin being absent."""
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    r = requests.get(f"{url}/server_info", headers=headers, timeout=timeout)
    if r.status_code in (401, 403):
        refused = "refused the API key" if api_key is not None else "requires an API key"
        return {"active": False, "error": f"the server at {url} {refused} (HTTP {r.status_code}) for /server_info: "
                                          "its status can be read only with the server's --api-key"}
    info = r.json()
    for state in info.get("internal_states") or []:
        if isinstance(state, dict) and "sgl_merge" in state:
            return state["sgl_merge"]
    return None


@dataclass
class ServerProcess:
    """A server as a child process in its own process group: `start()` launches it and waits until it
    is ready or dies, `stop()` ends it and every process it started. The child is SGLang's launcher
    with the plugin, ready once its scheduler reports sgl-merge active; the test harness
    (`sgl_merge.testing.ServeProcess`) runs `sgl-merge serve` through this same lifecycle and only
    reads readiness from the command's log instead."""

    argv: list[str]
    log_path: str | Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    url: str = ""
    api_key: str | None = None  # the server's --api-key, for the readiness check
    status: dict | None = None
    # What runs the server (the arguments follow): SGLang's launcher.
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"])
    # The process groups of the child and its descendants seen so far: `stop()` ends them all, so a
    # child that starts its server in a session of its own (as `sgl-merge serve` does) leaves none.
    groups: set[int] = field(default_factory=set, init=False, repr=False)

    # How errors name the child, what they advise when it is slow, and how many log lines they quote.
    what: ClassVar[str] = "SGLang server"
    slow_hint: ClassVar[str] = f" (a large model's first start can take longer: raise {WAIT_FLAG})"
    hint_lines: ClassVar[int] = 12

    @classmethod
    def prepare(cls, argv: list[str], log_path: str | None = None) -> "ServerProcess":
        env = dict(os.environ)
        cpu = wants_cpu(argv)
        if cpu:
            argv = with_cpu_defaults(argv)
        args = parse_args(argv)  # once: SGLang's parser is slow to build
        if cpu:
            env.update(cpu_engine_env(env, ranks=args.dp_size * args.tp_size * args.pp_size))
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        port = args.port
        return cls(argv=argv, log_path=log_path, env=env, url=f"http://{host}:{port}", api_key=args.api_key)

    def start(self, timeout: float = DEFAULT_WAIT_TIMEOUT_S, require_plugin: bool = True,
              progress=None) -> "ServerProcess":
        """Launch and wait up to `timeout` seconds until healthy and (unless `require_plugin` is
        False, which only a comparison against stock SGLang wants) reporting sgl-merge active.
        `progress(elapsed_s, line)`, if given, hears every PROGRESS_EVERY_S seconds of waiting what
        the server is doing (its log's newest line, where it logs to a file; else None)."""
        cmd = [*self.command, *self.argv]
        try:
            # (A signal that lands inside spawn leaves a child this process does not know of: at the
            # latest its parent-death signal ends it when this process exits.)
            with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext() as out:
                self.proc = spawn(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None)
            live_servers[self.proc.pid] = self
            self._wait_ready(timeout, require_plugin, progress)
            # Noted now, while the child runs: it may be gone by `stop()`, its server's group not.
            self._note_groups(self.processes())
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, require_plugin: bool, progress) -> None:
        start = time.monotonic()
        deadline, next_report = start + timeout, start + PROGRESS_EVERY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.what} exited with code {self.proc.returncode} before it was ready"
                                       + self._log_hint(tail=True))
            if self._ready(require_plugin):
                return
            if progress is not None and time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY_S
                progress(time.monotonic() - start, (self._log_tail(1) or [None])[-1])
            time.sleep(0.5)
        raise ServerStartError(f"{self.what} not ready after {timeout:.0f} s{self.slow_hint}"
                               + self._log_hint(tail=True))

    def _ready(self, require_plugin: bool) -> bool:
        """/health answers and the scheduler reports sgl-merge active. A server that is up without
        the plugin fails the start rather than being waited for: SGLang only logs a plugin's failure."""
        try:
            if requests.get(f"{self.url}/health", timeout=2).status_code != 200:
                return False
            self.status = plugin_status(self.url, api_key=self.api_key)
        except requests.RequestException:
            return False
        if not require_plugin or (self.status and self.status.get("active")):
            return True
        raise ServerStartError(
            "SGLang server is up but sgl-merge is not active in its scheduler: "
            f"{(self.status or {}).get('error') or 'the plugin did not load'}. "
            "Check that sgl-merge is installed in this environment (pip install -e .) "
            "and that SGLANG_PLUGINS, if set, includes sgl_merge." + self._log_hint()
        )

    def _log_tail(self, n: int) -> list[str]:
        """The last `n` non-empty lines of the server log (progress bars' carriage returns split)."""
        if not self.log_path:
            return []
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
        return [ln[:200] for ln in lines[-n:]]

    def _log_hint(self, tail: bool = False) -> str:
        if not self.log_path:
            return ""
        last = self._log_tail(self.hint_lines) if tail else []
        return f" (server log: {self.log_path})" + ("; its last lines:\n  " + "\n  ".join(last) if last else "")

    def processes(self) -> list[psutil.Process]:
        """The live processes of this server: the child and all its descendants."""
        try:
            root = psutil.Process(self.proc.pid)
            return [p for p in (root, *root.children(recursive=True)) if _running(p)]
        except psutil.Error:
            return []

    def _note_groups(self, procs: list[psutil.Process]) -> None:
        for p in procs:
            with contextlib.suppress(OSError):
                self.groups.add(os.getpgid(p.pid))
        self.groups.discard(os.getpgrp())  # never this process's own group

    def _left(self, procs: list[psutil.Process]) -> list[int]:
        """What is still running of `procs` and of the groups seen."""
        return sorted({p.pid for p in procs if _running(p)} | {pid for g in self.groups for pid in group_members(g)})

    def stop(self, grace: float = 20.0) -> list[int]:
        """SIGTERM the child (SGLang's launcher drains and stops its children; `sgl-merge serve` stops
        its server so), give it `grace` seconds to exit and as long again for every process of the
        groups seen and of its tree to go, then SIGKILL whatever is left, so no scheduler or
        detokenizer outlives the server. Returns the pids that were still there (killed now): a
        leak, which the test harness reports. Interrupted while it waits (a second Ctrl-C or
        signal), it SIGKILLs at once."""
        if self.proc is None:
            return []
        proc, tree, left = self.proc, [], []
        self.groups.add(proc.pid)
        try:
            tree = self.processes()
            self._note_groups(tree)
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + grace
            while (left := self._left(tree)) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for pgid in self.groups:
                kill_group(pgid)
            for p in tree:  # (one that left its group)
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait()
            self.proc = None
            self.groups.clear()  # (a later start's groups are its own; these pgids may be reused)
            live_servers.pop(proc.pid, None)
            stopped_groups.append(proc.pid)
        return left


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (one that ends meanwhile counts as gone)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def print_progress(elapsed: float, line: str | None) -> None:
    """A launcher's word while the server starts: how long so far, and its log's newest line."""
    print(f"  still starting ({elapsed:.0f} s)" + (f": {line}" if line else "..."), file=sys.stderr, flush=True)


def describe(server: ServerProcess) -> str:
    status = server.status or {}
    return (
        f"sgl-merge {__version__} active (sglang {status.get('sglang_version', '?')}) — "
        f"SGLang server listening on {server.url}"
    )


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(url: str | None, model_path: str | None, flags: list[str] = (), quiet: bool = False,
            env: dict[str, str] | None = None):
    """The URL of a server for a client job: `url` as given, else a server started on `model_path`
    (or, without one, a small random model) with `env` added, for the duration of the block, then
    stopped."""
    if url:
        yield url.rstrip("/")
        return
    from sgl_merge.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="sgl-merge-") as tmp:
        model = str(model_path or build_tiny_model(Path(tmp) / "model"))
        server = ServerProcess.prepare(["--model-path", model, "--port", str(free_port()), *flags],
                                       log_path=str(Path(tmp) / "server.log"))
        server.env.update(env or {})
        if not quiet:
            print("starting the server (on CPU about 30 s)...", flush=True)
        try:
            server.start(progress=None if quiet else print_progress)
            if not quiet:
                print(describe(server), flush=True)
            yield server.url
        finally:
            server.stop()

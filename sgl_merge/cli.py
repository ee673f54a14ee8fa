"""`sgl-merge`: the command line.

    sgl-merge serve [SGLang server arguments]   an SGLang server with the sgl-merge plugin
    sgl-merge demo [--url URL | --model-path DIR]
                                                the main job on the embedded default (CPU): single
                                                trace vs vote@k vs ThinkMerge@k, table and plot
    sgl-merge eval --dataset FILE.jsonl [--url URL | --model-path DIR] [--task math|exact|code]
                                                the same comparison on your model and data
    sgl-merge eval --task research --dataset Q.jsonl --corpus C.jsonl [--url URL]
                                                single agent vs vote@k vs merged agent@k
    sgl-merge research "QUESTION" --url URL [--k K] [--search local|searxng|ddgs|serper|none] [--mcp SPEC]
                                                a research agent whose tool calls and answer are
                                                merged over K branches; prints its steps, writes
                                                trace.json
"""

from __future__ import annotations

import signal
import sys
import threading

from sgl_merge import __version__

SERVE_HELP = """\
usage: sgl-merge serve [SGLang server arguments]

Start an SGLang server (python -m sglang.launch_server) with the sgl-merge plugin, wait until its
scheduler reports sgl-merge active, print where it listens, and run until Ctrl-C, SIGTERM or SIGHUP,
which stop all of its processes (exit status 0; a second signal kills them at once). Should
sgl-merge itself be killed (SIGKILL), the server gets SIGTERM from Linux and stops too. SGLang's
arguments are passed through unchanged.

sgl-merge's own option (every other argument is SGLang's):
  --wait-timeout S   seconds to wait for the server to report ready (default 1800: a large model's
                     first start downloads, loads and captures CUDA graphs); the launcher says what
                     the server is doing while it waits, and stops at once if the server dies

On a machine without a GPU, or with --device cpu, the CPU engine settings are added unless you set
them yourself: SGLANG_USE_CPU_ENGINE=1, --device cpu, --attention-backend torch_native,
--sampling-backend pytorch, --disable-overlap-schedule, --max-total-tokens 20000, --sleep-on-idle
(and a torch stand-in for sgl_kernel when the CUDA-only package cannot load).

Examples:
  sgl-merge serve --model-path ./tiny-model --device cpu --port 30000
  sgl-merge serve --model-path Qwen/Qwen3-8B --tp-size 2 --port 30000

SGLang's server arguments follow.
"""


def serve(argv: list[str]) -> int:
    from sgl_merge.compat import SGLangVersionError, check_sglang_version
    from sgl_merge.server import ServerProcess, ServerStartError, describe, print_progress, split_wait_timeout

    if any(a in ("-h", "--help") for a in argv):
        print(SERVE_HELP)
        from sgl_merge.server import validate_args

        validate_args(["--help"])  # SGLang's own argument help; exits
    try:
        wait_timeout, argv = split_wait_timeout(argv)
    except ValueError as e:
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 2
    try:
        check_sglang_version()
    except SGLangVersionError as e:
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 1
    try:
        server = ServerProcess.prepare(argv)
    except ValueError as e:  # a setting this machine cannot run (e.g. more CPU ranks than cores)
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 2

    # SIGINT too, explicitly: a launcher started in the background inherits it ignored.
    install_stop_handlers(force_sigint=True)
    try:
        server.start(timeout=wait_timeout, progress=print_progress)
        print(describe(server), flush=True)
        return server.proc.wait()
    except ServerStartError as e:
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("sgl-merge serve: stopping the server")
        return 0
    finally:
        server.stop()


def demo(argv: list[str]) -> int:
    from sgl_merge.evaluation.commands import demo as run_demo

    return run_demo(argv)


def evaluate(argv: list[str]) -> int:
    if "research" in (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--task") or "--task=research" in argv:
        from sgl_merge.research.evaluate import main as run_research_eval

        return run_research_eval(argv)
    from sgl_merge.evaluation.commands import evaluate as run_eval

    return run_eval(argv)


def research(argv: list[str]) -> int:
    from sgl_merge.research.command import research as run_research

    return run_research(argv)


COMMANDS = {"serve": serve, "demo": demo, "eval": evaluate, "research": research}

# SIGTERM (timeout, CI runners, job schedulers, kill) and SIGHUP (a closed terminal or SSH session)
# stop a command as Ctrl-C does; without this their default action would end the process before any
# `finally` ran, orphaning the server in its own process group.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
received: list[int] = []  # the stop signals this process got, in order
_previous: dict[int, object] = {}  # the handlers install_stop_handlers replaced


class Stopped(KeyboardInterrupt):
    """A stop signal, raised in the main thread where Ctrl-C's KeyboardInterrupt would be, so every
    `except KeyboardInterrupt` and `finally` (the server's stop among them) runs as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum, frame):
    received.append(signum)
    # A second signal lands in the first one's cleanup, where ServerProcess.stop() takes it as
    # "no more grace" and SIGKILLs the server's process group at once.
    raise Stopped(signum)


def install_stop_handlers(force_sigint: bool = False) -> None:
    """Stop on SIGINT, SIGTERM and SIGHUP by raising `Stopped` (until `restore_handlers()`). A
    signal this process inherited ignored stays ignored (nohup's SIGHUP; SIGINT in a background job,
    unless `force_sigint`). Only the main thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_stop_signal or (current is signal.SIG_IGN and not (force_sigint and sig == signal.SIGINT)):
            continue
        _previous.setdefault(sig, signal.SIG_DFL if current is None else current)  # (None: not set from Python)
        signal.signal(sig, _on_stop_signal)


def restore_handlers() -> None:
    if threading.current_thread() is threading.main_thread():
        while _previous:
            sig, handler = _previous.popitem()
            signal.signal(sig, handler)


def _say(line: str) -> None:
    """A line on stderr, which after SIGHUP may be a terminal that is gone."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _run(command: str, argv: list[str]) -> int:
    install_stop_handlers()
    try:
        code = COMMANDS[command](argv)
    except KeyboardInterrupt:  # a stop signal before the command could take it
        code = 130
    finally:
        server = sys.modules.get("sgl_merge.server")
        while server is not None:
            try:
                server.stop_all()  # a server its command did not stop: never left behind
                break
            except KeyboardInterrupt:  # that server is SIGKILLed now; on to the rest
                continue
        restore_handlers()  # everything is stopped: a further signal does what it did before
    if received:
        stopped = server is not None and server.stopped_groups
        _say(f"sgl-merge {command}: stopped by {signal.Signals(received[0]).name}"
             + ("; its SGLang server and all the server's processes are stopped" if stopped else ""))
        # A server asked to stop ends normally; a job stopped short exits as the signal's death
        # would show in a shell (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
        code = 0 if command == "serve" else 128 + received[0]
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\nsgl-merge {__version__}. `sgl-merge COMMAND --help` for a command's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsgl-merge: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return _run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())

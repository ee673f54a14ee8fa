"""`sgl-merge`: the command line.

    sgl-merge serve [SGLang server arguments]   an SGLang server with the sgl-merge plugin
    sgl-merge demo [--url URL | --model-path DIR]
                                                the main job on the embedded default (CPU): single
                                                trace vs vote@k vs ThinkMerge@k, table and plot
    sgl-merge eval --dataset FILE.jsonl [--url URL | --model-path DIR] [--task math|code]
                                                the same comparison on your model and data
"""

from __future__ import annotations

import signal
import sys

from sgl_merge import __version__

SERVE_HELP = """\
usage: sgl-merge serve [SGLang server arguments]

Start an SGLang server (python -m sglang.launch_server) with the sgl-merge plugin, wait until its
scheduler reports sgl-merge active, print where it listens, and run until Ctrl-C or SIGTERM, which
stop all of its processes. SGLang's arguments are passed through unchanged.

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

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Explicitly, since a launcher started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start(timeout=wait_timeout, progress=print_progress)
        print(describe(server), flush=True)
        return server.proc.wait()
    except ServerStartError as e:
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sgl-merge serve: stopping the server", file=sys.stderr)
        return 0
    finally:
        server.stop()


def demo(argv: list[str]) -> int:
    from sgl_merge.evaluation.commands import demo as run_demo

    return run_demo(argv)


def evaluate(argv: list[str]) -> int:
    from sgl_merge.evaluation.commands import evaluate as run_eval

    return run_eval(argv)


COMMANDS = {"serve": serve, "demo": demo, "eval": evaluate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\nsgl-merge {__version__}. `sgl-merge COMMAND --help` for a command's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsgl-merge: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

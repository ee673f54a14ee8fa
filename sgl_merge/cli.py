"""`sgl-merge`: the command line.

    sgl-merge serve [SGLang server arguments]   an SGLang server with the sgl-merge plugin
    sgl-merge demo [--model-path DIR]           the main job on the embedded default (CPU)
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import uuid
from pathlib import Path

from sgl_merge import __version__

SERVE_HELP = """\
usage: sgl-merge serve [SGLang server arguments]

Start an SGLang server (python -m sglang.launch_server) with the sgl-merge plugin, wait until its
scheduler reports sgl-merge active, print where it listens, and run until Ctrl-C or SIGTERM, which
stop all of its processes. Every argument is SGLang's own and is passed through unchanged.

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
    from sgl_merge.server import ServerProcess, ServerStartError, describe

    if any(a in ("-h", "--help") for a in argv):
        print(SERVE_HELP)
        from sgl_merge.server import validate_args

        validate_args(["--help"])  # SGLang's own argument help; exits
    try:
        check_sglang_version()
    except SGLangVersionError as e:
        print(f"sgl-merge serve: {e}", file=sys.stderr)
        return 1
    server = ServerProcess.prepare(argv)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Explicitly, since a launcher started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start()
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
    """Placeholder until the bundled reasoner lands: start a CPU server on a small random model
    (or --model-path), run one batched generation and one merge group through it."""
    import requests

    from sgl_merge.server import ServerProcess, ServerStartError, describe
    from sgl_merge.testing import build_tiny_model

    parser = argparse.ArgumentParser(prog="sgl-merge demo", description=demo.__doc__)
    parser.add_argument("--model-path", help="model directory (default: a small random model)")
    parser.add_argument("--port", type=int, default=30000)
    args = parser.parse_args(argv)
    print(
        "sgl-merge demo (placeholder): the bundled reasoning model and the accuracy comparison "
        "are not shipped yet; this starts the CPU server, runs one generation and one merge group.",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sgl-merge-demo-") as tmp:
        model = args.model_path or str(build_tiny_model(Path(tmp) / "model"))
        server = ServerProcess.prepare(
            ["--model-path", model, "--device", "cpu", "--port", str(args.port)],
            log_path=str(Path(tmp) / "server.log"),
        )
        try:
            print("starting the CPU server (about 20-30 s)...", flush=True)
            server.start()
            print(describe(server), flush=True)
            prompts = ["Think step by step: 12 + 30 =", "def add(a, b):"]
            out = requests.post(
                f"{server.url}/generate",
                json={"text": prompts, "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
                timeout=120,
            ).json()
            for prompt, item in zip(prompts, out):
                print(f"{prompt!r} -> {item['text']!r} ({item['meta_info']['completion_tokens']} tokens)")
            merge = {"group": f"demo-{uuid.uuid4().hex}", "size": len(prompts)}
            merged = requests.post(
                f"{server.url}/generate",
                json={"text": prompts, "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                           "custom_params": {"sgl_merge": merge}}},
                timeout=120,
            ).json()
            print(f"merged, one answer for both contexts -> {merged[0]['text']!r}")
            for prompt, item in zip(prompts, merged):
                print(f"  {prompt!r}: own argmax agreed with the merged token at "
                      f"{item['meta_info']['sgl_merge']['agreement']:.0%} of steps")
            return 0
        except ServerStartError as e:
            print(f"sgl-merge demo: {e}", file=sys.stderr)
            return 1
        finally:
            server.stop()


COMMANDS = {"serve": serve, "demo": demo}


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

"""`warmserve serve | load | unload | ps | demo`.

Only `serve` and `demo` import the server side (torch among it), so the client commands start
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import sys
import time

from warmserve.client import AdminClient, ServerError
from warmserve.text_tables import format_bytes, format_table

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "WARMSERVE_API_KEY"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or the help already says it
    (a default read from the environment, such as an API key, is never printed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def warmserve_version() -> str:
    try:
        return importlib.metadata.version("warmserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmserve",
        description="Serve many LLMs from one pool of pre-warmed workers.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"warmserve {warmserve_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, formatter_class=HelpFormatter, **options)

    serve = add_command("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="the gateway's port")
    serve.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="where workers run"
    )
    serve.add_argument(
        "--workers", type=_positive_int, help="worker processes (default: one per GPU, 2 on CPU)"
    )
    serve.add_argument(
        "--models", metavar="MODELS_YAML", help="registry of models to load on demand by name"
    )
    serve.add_argument("--model-root", help="directory that model paths are resolved against")
    serve.add_argument(
        "--host-cache-gb", type=float, default=16.0, help="host memory for unloaded weights"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=_non_negative_int,
        default=256,
        help="requests a model may hold waiting beyond its running batch; more get 503",
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper, help="log verbosity"
    )
    serve.set_defaults(run=run_serve)

    load = add_command("load", help="load a model into the running server")
    load.add_argument("name", help="the name clients put in 'model'")
    load.add_argument(
        "path",
        help="checkpoint folder or .gguf file, relative to the server's --model-root",
    )
    load.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size")
    load.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="serving dtype (auto: the checkpoint's)",
    )
    load.add_argument(
        "--max-model-len", type=_positive_int, help="context length (default: the model's)"
    )
    load.add_argument("--port", type=int, help="also serve this model alone on this port")
    load.set_defaults(run=run_load)

    unload = add_command("unload", help="unload a model from the running server")
    unload.add_argument("name", help="the model's name")
    unload.set_defaults(run=run_unload)

    ps = add_command("ps", help="list the running server's models and workers")
    ps.set_defaults(run=run_ps)

    for client_command in (load, unload, ps):
        client_command.add_argument("--url", default=DEFAULT_URL, help="the server's address")
        client_command.add_argument(
            "--api-key",
            default=os.environ.get(API_KEY_ENV),
            help=f"the server's API key (default: ${API_KEY_ENV})",
        )

    demo = add_command(
        "demo",
        help="answer a question with a real model (SmolLM2, fetched once), swap to another "
        "model and back, and print the timings",
    )
    demo.add_argument(
        "--dir", default=".checkpoints", help="where the random-weight demo checkpoints live"
    )
    demo.set_defaults(run=run_demo)

    bench = add_command(
        "bench", help="measure swap, load and decode against baselines; write BENCHMARKS.md"
    )
    from warmserve.bench.swap import add_arguments

    add_arguments(bench)
    bench.set_defaults(run=run_bench)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    from warmserve.bench.swap import run

    return run(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ServerError as exc:
        print(f"warmserve: error: {exc}", file=sys.stderr)
        return 1


def run_serve(args: argparse.Namespace) -> int:
    from warmserve.api.server import bind_socket
    from warmserve.config import ConfigError, ServerConfig
    from warmserve.controller.pool import StartupError
    from warmserve.controller.registry import RegistryError, check_registry_paths

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        workers=args.workers,
        model_root=args.model_root,
        models_file=args.models,
        host_cache_gb=args.host_cache_gb,
        api_key=args.api_key or None,
        max_queued_requests=args.max_queued_requests,
    )
    if args.models:
        try:
            check_registry_paths(args.models, args.model_root)
        except RegistryError as exc:
            print(f"warmserve: error: {exc}", file=sys.stderr)
            return 1
    # Bound before the workers start, so a taken port fails at once; connections are refused
    # until the pool is warm and the gateway listens.
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        print(
            f"warmserve: error: cannot listen on {config.host}:{config.port}: {exc.strerror}; "
            "stop what uses that port or choose another with --port",
            file=sys.stderr,
        )
        return 1
    try:
        with sock:
            asyncio.run(_serve(config, sock, args.log_level))
    except (StartupError, RegistryError, ConfigError) as exc:
        print(f"warmserve: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config, sock, log_level: str) -> None:
    from warmserve.api.gateway import serve_gateway
    from warmserve.controller.controller import Controller

    logger = logging.getLogger("warmserve")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)

    controller = Controller(config)
    try:
        logger.info("starting the worker pool (device %s)", config.device)
        if await _until_stopped(controller.start(), stop):
            await serve_gateway(controller, config, sock, stop, log_level=log_level)
    finally:
        logger.info("stopping the worker pool")
        await controller.close()


async def _until_stopped(work, stop: asyncio.Event) -> bool:
    """Runs `work` unless `stop` is set first (then cancels it); True if `work` finished."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def run_load(args: argparse.Namespace) -> int:
    from warmserve.load_progress import load_with_progress

    # Two clients: the load's request blocks in a thread while the other polls its progress.
    with AdminClient(args.url, args.api_key) as client, AdminClient(args.url, args.api_key) as poll:
        result = load_with_progress(
            args.name,
            lambda: client.load(
                args.name,
                args.path,
                tensor_parallel_size=args.tp,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                port=args.port,
            ),
            poll.load_progress,
            sys.stderr,
        )
    workers = ", ".join(str(worker) for worker in result["workers"])
    line = (
        f"loaded {result['name']} on worker(s) {workers} in {result['load_seconds']:.3f} s "
        f"(from {result['source']})"
    )
    if result.get("port"):
        line += f"; also serving it on port {result['port']}"
    print(line)
    return 0


def run_unload(args: argparse.Namespace) -> int:
    with AdminClient(args.url, args.api_key) as client:
        result = client.unload(args.name)
    print(f"unloaded {result['name']} in {result['unload_seconds']:.3f} s")
    return 0


def run_ps(args: argparse.Namespace) -> int:
    with AdminClient(args.url, args.api_key) as client:
        models, workers = client.models(), client.workers()
    now = time.time()
    if models:
        print(
            format_table(
                [
                    "MODEL",
                    "STATE",
                    "WORKERS",
                    "TP",
                    "DTYPE",
                    "SOURCE",
                    "LOAD S",
                    "LAST USED",
                    "IN FLIGHT",
                    "KEEP ALIVE",
                    "PINNED",
                    "PORT",
                ],
                [
                    [
                        model["name"],
                        model["state"],
                        ",".join(str(worker) for worker in model["workers"]) or "-",
                        model["tensor_parallel_size"],
                        model["dtype"],
                        model["load_source"] or "-",
                        _seconds(model["load_seconds"]),
                        _ago(model["last_used"], now),
                        model["requests_in_flight"],
                        _keep_alive(model["keep_alive"]),
                        "yes" if model["pinned"] else "no",
                        model["port"] or "-",
                    ]
                    for model in models
                ],
            )
        )
        for model in models:
            if model.get("error"):
                print(f"{model['name']} failed: {model['error']}")
    else:
        print("no models")
    print()
    print(
        format_table(
            ["WORKER", "PID", "DEVICE", "STATE", "MODEL", "MEMORY USED", "MEMORY TOTAL"],
            [
                [
                    worker["id"],
                    worker["pid"] or "-",
                    worker["device"],
                    worker["state"],
                    worker["model"] or "-",
                    format_bytes(worker["memory_used_bytes"]),
                    format_bytes(worker["memory_total_bytes"]),
                ]
                for worker in workers
            ],
        )
    )
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from warmserve.demo import run_demo_in_process

    return run_demo_in_process(args.dir)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ago(unix_time: float | None, now: float) -> str:
    if unix_time is None:
        return "-"
    seconds = max(0, round(now - unix_time))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _keep_alive(seconds: float) -> str:
    if seconds < 0:
        return "forever"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"

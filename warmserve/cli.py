"""`warmserve serve | load | unload | ps | demo | bench [serve|trace]`.

Only `serve` and `demo` import the server side (torch among it), so the client commands start
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from warmserve.admin_commands import run_load, run_ps, run_unload
from warmserve.cli_help import LOG_LEVELS, HelpFormatter, warmserve_version
from warmserve.client import ServerError
from warmserve.config import (
    CPU_WORKER_MEMORY_GB,
    DTYPES,
    MAX_MODEL_LEN,
    EngineConfig,
    ServerConfig,
)
from warmserve.profiling import SERVER_PROFILE_ENV, profiled

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "WARMSERVE_API_KEY"


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
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.9,
        help="share of each GPU's memory warmserve may use, CUDA context included (default 0.9)",
    )
    serve.add_argument(
        "--worker-memory-gb",
        type=_positive_float,
        help="cap on what models may take on each worker (on CPU: the memory each worker "
        f"stands in for, default {CPU_WORKER_MEMORY_GB:g})",
    )
    serve.add_argument(
        "--max-model-len",
        type=_context_length,
        help="context length of a model whose load names none (default: the checkpoint's)",
    )
    serve.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=EngineConfig.max_num_seqs,
        help=f"sequences each model runs at once (default {EngineConfig.max_num_seqs})",
    )
    serve.add_argument(
        "--prefill-tokens-beside-decodes",
        type=_positive_int,
        default=EngineConfig.prefill_tokens_beside_decodes,
        help="prompt tokens a step may carry while it also decodes running streams, at least: "
        "smaller keeps their inter-token latency even, larger admits prompts faster (default "
        f"{EngineConfig.prefill_tokens_beside_decodes})",
    )
    serve.add_argument(
        "--prompt-step-time-ratio",
        type=_time_ratio,
        default=EngineConfig.prompt_step_time_ratio,
        help="once a model has run steps, a step that decodes carries more prompt tokens while "
        "it stays within this many decode steps' time, as measured; 0: never more than "
        f"--prefill-tokens-beside-decodes (default {EngineConfig.prompt_step_time_ratio})",
    )
    serve.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each engine step before the host has read the tokens of the one before, "
        "so that scheduling and input building overlap the GPU's work (as vLLM's flag); "
        "requests with penalties, logprobs or a grammar still wait for the step before "
        "(default: on with GPU workers, off on CPU, where nothing overlaps)",
    )
    serve.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="kernels whose result for a token does not depend on the batch it runs in, so "
        "that greedy output is the same however many requests run beside it (GPU only; "
        "slower; as vLLM's batch-invariant mode)",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=_non_negative_int,
        default=256,
        help="requests a model may hold waiting (for its load, or beyond its running batch); "
        "more get 503 (default 256)",
    )
    serve.add_argument(
        "--min-residency",
        type=_non_negative_float,
        default=ServerConfig.min_residency_s,
        help="seconds a model loaded on demand stays before it may be evicted for another, so "
        f"that alternating requests are served in groups (default {ServerConfig.min_residency_s:g})",
    )
    serve.add_argument(
        "--queue-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds a request waits for its model to be loaded before a 503 (default 60)",
    )
    serve.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="run the workers on this Ray cluster ('auto': the one this host belongs to): one "
        "per GPU on every node, or on CPU --workers spread over the nodes (needs warmserve[ray])",
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
        choices=sorted(DTYPES),
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
        "bench",
        help="measure swap, load and decode against baselines; `bench serve`: one model under "
        "HTTP load; `bench trace`: many models under a request trace",
    )
    from warmserve.bench import options as bench_options
    from warmserve.bench import serve as serve_bench
    from warmserve.bench import trace as trace_bench

    bench_options.add_swap_arguments(bench)
    bench.set_defaults(run=run_swap_bench)
    # Optional: plain `warmserve bench` stays the swap benchmark.
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, module, text in (
        ("serve", serve_bench, "one model over HTTP under load, like `vllm bench serve`"),
        ("trace", trace_bench, "many models on one server under a request trace"),
    ):
        benchmark = benchmarks.add_parser(
            name, help=text, description=module.__doc__, formatter_class=HelpFormatter
        )
        module.add_arguments(benchmark)
        benchmark.set_defaults(run=module.run)
    return parser


def run_swap_bench(args: argparse.Namespace) -> int:
    from warmserve.bench.swap import run  # imports torch: only when the benchmark runs

    return run(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _context_length(text: str) -> int:
    value = int(text)
    if not 2 <= value <= MAX_MODEL_LEN:
        raise argparse.ArgumentTypeError(f"must be from 2 to {MAX_MODEL_LEN}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def _time_ratio(text: str) -> float:
    value = float(text)
    if not (value == 0 or 1 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 or a number of at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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
    import uvloop

    from warmserve.api.server import bind_socket
    from warmserve.config import ConfigError
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
        worker_memory_gb=args.worker_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_queued_requests=args.max_queued_requests,
        queue_timeout_s=args.queue_timeout,
        min_residency_s=args.min_residency,
        ray_address=args.ray_address,
        engine=EngineConfig(
            max_num_seqs=args.max_num_seqs,
            prefill_tokens_beside_decodes=args.prefill_tokens_beside_decodes,
            prompt_step_time_ratio=args.prompt_step_time_ratio,
            async_scheduling=args.async_scheduling,
            batch_invariant=args.batch_invariant,
        ),
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
        with sock, profiled(os.environ.get(SERVER_PROFILE_ENV)):
            uvloop.run(_serve(config, sock, args.log_level))
    except (StartupError, RegistryError, ConfigError) as exc:
        print(f"warmserve: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config, sock, log_level: str) -> None:
    from warmserve.api.gateway import serve_gateway
    from warmserve.controller.controller import Controller
    from warmserve.process_gc import freeze_startup_objects

    logger = logging.getLogger("warmserve")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)

    controller = Controller(config)
    try:
        logger.info("starting the worker pool (device %s)", config.device)
        if await _until_stopped(controller.start(), stop):
            freeze_startup_objects()
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


def run_demo(args: argparse.Namespace) -> int:
    from warmserve.demo import run_demo_in_process

    return run_demo_in_process(args.dir)

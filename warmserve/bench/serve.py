"""`warmserve bench serve`: one model served over HTTP under load, measured like `vllm bench
serve`, beside the Python API and the engine on the same workload in the same run.

1. `warmserve serve` starts as a subprocess (default flags plus `--serve-arg`s), the model is
   loaded through the admin API, one request warms it up, then streaming `/v1/completions`
   runs a concurrency sweep and Poisson arrival rates, for fixed lengths and a ShareGPT-like mix.
2. The server stops; `Controller.generate` in this process runs the fixed-length concurrency
   sweep with the same requests (the Python API's figure).
3. The engine alone (`Engine.step` in this process) decodes a full batch of each concurrency
   with prompts of the fixed input length: the decode rate the server could reach.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from warmserve.bench import http_load, options, report
from warmserve.bench.serve_plan import (
    ENGINE_FLAGS,
    FULL,
    MIXES,
    MODEL_NAME,
    QUICK,
    build_scenarios,
    engine_flags,
    engine_serve_args,
)
from warmserve.bench.serve_report import render_markdown, targets
from warmserve.bench.server_process import BenchServer
from warmserve.profiling import SERVER_PROFILE_ENV, WORKER_PROFILE_ENV

SEQUENTIAL_CHECKS = 8  # requests of the greedy consistency check sent alone too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_common_arguments(parser, "tiny model, small sweep (CI)")
    parser.add_argument("--shape", help=f"of the built model (default {FULL['shape']})")
    parser.add_argument(
        "--model-path", help="an existing checkpoint folder or .gguf file instead of --shape"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 16 64 128")
    parser.add_argument("--rates", type=float, nargs="+", help="requests/s; default 1 4 16")
    parser.add_argument("--mixes", nargs="+", choices=MIXES, help="default both")
    parser.add_argument("--input-len", type=int, help="of the fixed mix (default 512)")
    parser.add_argument("--output-len", type=int, help="of the fixed mix (default 128)")
    parser.add_argument(
        "--min-requests",
        type=int,
        help="per concurrency level, which sends max(this, 4 x clients); default 16",
    )
    parser.add_argument("--duration-s", type=float, help="of each Poisson rate (default 20)")
    parser.add_argument("--decode-steps", type=int, help="timed engine steps (default 32)")
    parser.add_argument("--max-model-len", type=int, help="of the loaded model")
    parser.add_argument("--length-scale", type=float, help="shrinks the ShareGPT-like mix")
    parser.add_argument(
        "--profile-server",
        metavar="PATH",
        help="run the server process under cProfile and write its statistics to PATH when it "
        "stops (python -m pstats PATH): where its CPU time goes",
    )
    parser.add_argument(
        "--profile-worker",
        metavar="PREFIX",
        help="run each worker process under cProfile and write its statistics to "
        "PREFIX.worker<id> when it stops: where the host time of its engine steps goes",
    )
    for flag in ENGINE_FLAGS:
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"the server with {flag} (or without), and the Python API and the engine "
            "alone with the same engine setting (default: the server's default)",
        )
    parser.add_argument(
        "--json-schema",
        action="store_true",
        help="also run each fixed-length concurrency with every request's output constrained "
        "by a JSON schema (response_format), to measure what the grammar mask costs",
    )


def run(args: argparse.Namespace) -> int:
    # Imported here: `warmserve ps` and the other client commands build this parser too.
    from warmserve.bench.checkpoints import bench_checkpoint
    from warmserve.bench.swap import decode_timings
    from warmserve.loader.checkpoint import CheckpointError, read_model_config

    options.apply_presets(args, FULL, QUICK)
    device = options.resolve_device(args.device)
    if args.model_path:  # a checkpoint folder or a .gguf file
        model = Path(args.model_path).name
        args.load_dtype = args.dtype or "auto"
    else:
        dtype = args.dtype or options.default_dtype(device)
        model = args.shape
        args.load_dtype = "auto"  # the built checkpoint's own
    try:
        checkpoint, config = read_model_config(
            args.model_path or bench_checkpoint(Path(args.checkpoints), args.shape, dtype)
        )
    except CheckpointError as exc:
        print(f"warmserve bench serve: error: {exc}", file=sys.stderr)
        return 2
    serve_args = [*options.quick_serve_args(args), *args.serve_arg]
    serve_args += engine_serve_args(args)
    context_len = args.max_model_len or config["max_position_embeddings"]
    scenarios = build_scenarios(args, context_len)
    results: dict = {
        "command": "warmserve bench serve " + " ".join(sys.argv[3:]),
        "device": device,
        "model": model,
        "checkpoint": str(checkpoint),
        "serve_args": serve_args,
        "dtype": (
            args.load_dtype
            if args.load_dtype != "auto"
            else config.get("dtype") or config.get("torch_dtype")  # the newer name first
        ),
        "fixed_lengths": [args.input_len, args.output_len],
    }
    out = Path(args.out)
    log = out / f"serve-{model}.log"
    served = asyncio.run(http_runs(device, checkpoint, serve_args, log, args, scenarios))
    results["http"] = served["runs"]
    results["greedy_consistency"] = served["greedy_consistency"]
    results["load"] = {
        "load": served["load"],
        "warm_seconds": served["warm_seconds"],
        "memory_bytes": served["memory_bytes"],
    }
    # The baselines are for the fixed lengths' concurrency sweep.
    fixed = [
        s
        for s in scenarios
        if s["mix"] == "fixed" and s["kind"] == "concurrency" and not s.get("structured")
    ]
    if fixed:
        results["python_api"] = asyncio.run(python_api_runs(device, checkpoint, args, fixed))
        results["engine_decode"] = decode_timings(
            checkpoint,
            device,
            tuple(args.concurrency),
            args.input_len,
            args.decode_steps,
            dtype=args.load_dtype,
            **engine_flags(args),
        )
        results["comparison"] = comparison(results, args.concurrency)
    results["device"] = options.device_name(device)  # after the runs: see device_name
    results["targets"] = [
        {"target": name, "measured": measured, "met": met}
        for name, measured, met in targets(results)
    ]
    json_path = out / f"serve-{model}.json"
    report.write_json(json_path, results)
    markdown = render_markdown(results)
    report.update_section(Path(args.markdown), f"warmserve bench serve {model}", markdown)
    print(markdown)
    print(f"wrote {json_path} and a section of {args.markdown}")
    return 0 if all(entry["failed"] == 0 for entry in results["http"].values()) else 1


async def no_step_totals() -> dict[str, tuple[float, float]]:
    return {}


async def sweep(
    scenarios: list[dict],
    send: http_load.Sender,
    server_cpu_seconds: Callable[[], float | None] = lambda: None,
    step_totals: Callable[[], Awaitable[dict[str, tuple[float, float]]]] = no_step_totals,
) -> dict:
    """Runs every scenario; with `server_cpu_seconds`, each one's figures also say how much CPU
    time the server process spent on it, and the output tokens it streamed per CPU second: the
    rate one server process can stream at when its CPU is the limit. Each run also says how busy
    this process (the clients) kept its CPU: near 1, the figures are the client's limit; and,
    with `step_totals` (the server's /metrics), how many engine steps of each kind ran and their
    mean time."""
    await send(scenarios[0]["requests"][0])  # warm-up, as vLLM's benchmark sends a test prompt
    figures = {}
    for scenario in scenarios:
        cpu_before, client_cpu_before = server_cpu_seconds(), time.process_time()
        steps_before = await step_totals()
        if scenario["kind"] == "concurrency":
            run = await http_load.run_clients(scenario["requests"], send, scenario["value"])
        else:
            run = await http_load.run_poisson(
                scenario["requests"], send, scenario["value"], scenario["seed"]
            )
        figures[scenario["name"]] = http_load.serving_metrics(run)
        client_cpu_s = time.process_time() - client_cpu_before
        figures[scenario["name"]]["client_cpu_per_s"] = client_cpu_s / run.duration
        steps = http_load.step_deltas(steps_before, await step_totals())
        if steps:
            figures[scenario["name"]]["engine_steps"] = steps
        cpu_after = server_cpu_seconds()
        if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
            entry = figures[scenario["name"]]
            entry["server_cpu_s"] = cpu_after - cpu_before
            entry["server_output_tokens_per_cpu_s"] = entry["total_output_tokens"] / (
                cpu_after - cpu_before
            )
        print(f"{scenario['name']}: {summary_line(figures[scenario['name']])}", flush=True)
    return figures


async def http_runs(device, checkpoint, serve_args, log, args, scenarios) -> dict:
    environment = {}
    if args.profile_server:
        environment[SERVER_PROFILE_ENV] = str(Path(args.profile_server).resolve())
    if args.profile_worker:
        environment[WORKER_PROFILE_ENV] = str(Path(args.profile_worker).resolve())
    with BenchServer(device, checkpoint.parent, serve_args, log, environment) as server:
        async with http_load.http_client(server.url) as client:
            body = {"name": MODEL_NAME, "path": checkpoint.name, "dtype": args.load_dtype}
            if args.max_model_len:
                body["max_model_len"] = args.max_model_len
            response = await client.post("/admin/models", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"loading {checkpoint} failed: {response.text}")
            print(f"server {server.url}: loaded {response.json()}", flush=True)
            warm_s = await http_load.wait_until_warm(client, MODEL_NAME)
            print(f"warm (kernels compiled, graphs captured) {warm_s:.2f} s after the load")
            listing = await client.get("/admin/models")
            listing.raise_for_status()
            # Weights, activation headroom and the KV cache it always keeps, as placed.
            memory_bytes = next(m for m in listing.json() if m["name"] == MODEL_NAME)[
                "memory_bytes"
            ]

            async def step_totals() -> dict[str, tuple[float, float]]:
                response = await client.get("/metrics")
                response.raise_for_status()
                return http_load.engine_step_totals(response.text)

            async with http_load.stream_session(server.url) as session:
                send = http_load.http_sender(session)
                figures = await sweep(scenarios, send, server.cpu_seconds, step_totals)
                consistency = await greedy_consistency(scenarios, send)
            return {
                "load": response.json(),
                "warm_seconds": warm_s,
                "memory_bytes": memory_bytes,
                "runs": figures,
                "greedy_consistency": consistency,
            }


async def greedy_consistency(scenarios: list[dict], send: http_load.Sender) -> dict | None:
    """The first requests of the largest fixed-length concurrency run sent one at a time, then
    as many as it has clients at once: a batch must not change a request's greedy output (one
    sequence's rows computed differently beside others, a slot shared by two sequences)."""
    runs = [s for s in scenarios if s["kind"] == "concurrency" and s["mix"] == "fixed"]
    runs = [s for s in runs if not s.get("structured")]
    if not runs:
        return None
    largest = max(runs, key=lambda scenario: scenario["value"])
    requests = largest["requests"][: largest["value"]]
    alone = [await send(request) for request in requests[:SEQUENTIAL_CHECKS]]
    together = await http_load.run_clients(requests, send, len(requests))
    batched = {id(result.request): result for result in together.results}
    equal, agreeing = 0, []
    for result in alone:
        other = batched[id(result.request)].text
        equal += result.ok and result.text != "" and result.text == other
        # How much of the output agrees before the first difference: a slot or row mix-up
        # differs from the first token on; rounding in another batch shape flips a near tie
        # somewhere along the way.
        common = next(
            (i for i, (a, b) in enumerate(zip(result.text, other, strict=False)) if a != b),
            min(len(result.text), len(other)),
        )
        agreeing.append(round(common / max(len(result.text), 1), 3))
    return {
        "concurrent_streams": len(requests),
        "compared": len(alone),
        "equal": equal,
        "agreeing_prefix": agreeing,
    }


async def python_api_runs(device, checkpoint, args, scenarios) -> dict:
    from warmserve import Controller, ServerConfig
    from warmserve.config import EngineConfig

    engine = EngineConfig(**engine_flags(args))
    async with Controller(ServerConfig(device=device, workers=1, engine=engine)) as controller:
        await controller.load(
            MODEL_NAME, str(checkpoint), dtype=args.load_dtype, max_model_len=args.max_model_len
        )
        while controller.model(MODEL_NAME).warm_seconds is None:  # as the HTTP run waits
            await asyncio.sleep(0.05)
        return await sweep(scenarios, http_load.controller_sender(controller))


def comparison(results: dict, concurrency: list[int]) -> list[dict]:
    """Per concurrency level (fixed lengths): output tok/s over HTTP, through the Python API,
    and the engine's decode rate at that batch."""
    rows = []
    for clients in concurrency:
        name = f"fixed concurrency {clients:g}"
        http, api = results["http"].get(name), results["python_api"].get(name)
        if http is None or api is None:
            continue
        rows.append(
            {
                "concurrency": clients,
                "http_output_throughput": http["output_throughput"],
                "python_api_output_throughput": api["output_throughput"],
                # None when no request got through the Python API (nothing to compare with).
                "http_over_python_api": (
                    http["output_throughput"] / api["output_throughput"]
                    if api["output_throughput"]
                    else None
                ),
                "engine_decode_tokens_per_s": results["engine_decode"][clients]["tokens_per_s"],
                "http_ttft_median_ms": http["ttft_ms"]["median"],
                "python_api_ttft_median_ms": api["ttft_ms"]["median"],
            }
        )
    return rows


def summary_line(figures: dict) -> str:
    line = (
        f"{figures['completed']} done, {figures['failed']} failed, "
        f"{figures['output_throughput']:.0f} output tok/s, "
        f"TTFT median {report.number(figures['ttft_ms']['median'])} ms, "
        f"ITL median {report.number(figures['itl_ms']['median'], 2)} ms, "
        f"client process {figures['client_cpu_per_s']:.2f} CPU s per s"
    )
    if "server_output_tokens_per_cpu_s" in figures:
        line += (
            f", server process {figures['server_cpu_s']:.2f} CPU s "
            f"({figures['server_output_tokens_per_cpu_s']:.0f} output tok per CPU s)"
        )
    return line

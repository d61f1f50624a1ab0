"""`warmserve bench trace`: many models on one server under a request trace.

The models are registered in a `--models` registry file, so requests load them on demand and
the server evicts to make room. One seeded trace (model drawn by popularity, 40/30/20/10 % for
four models by default: weights N, N-1, ..., 1) runs three ways against the same server: one
sequential client, N concurrent clients, and Poisson arrivals. Per phase: TTFT and end-to-end
latency, requests refused by HTTP status, loads on demand, evictions and unloads (from
`/metrics`), and which models `/admin/models` shows resident afterwards.

The all-resident ideal is measured first on the same server: each model in turn is loaded and
timed alone (nothing else running). A phase's ratio is the sum of its completed requests'
latencies over the sum of their models' warm latencies: 1.0 means no request paid for a load,
an eviction or a queue. Two phases follow (see bench/trace_swaps.py): each model's swap against
its copy floor, and a load beside a streaming model.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path

from warmserve.bench import http_load, options, report, trace_swaps
from warmserve.bench.server_process import BenchServer
from warmserve.bench.trace_report import render_markdown, targets
from warmserve.bench.workloads import random_prompt
from warmserve.config import ServerConfig

FULL = {  # issue 15's trace: four models, 36 GB together in bf16
    "models": ["qwen3-0.6b", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-8b"],
    "requests": 80,
    "clients": 8,
    "rate": 4.0,
    "input_len": 64,
    "output_len": 16,
    "ideal_requests": 5,
    "keep_alive": "5m",
}
QUICK = {  # two tiny models on one CPU worker, so that they swap; CI runs this
    **FULL,
    "models": ["tiny", "tiny-opt"],
    "requests": 8,
    "clients": 2,
    "input_len": 16,
    "output_len": 4,
    "ideal_requests": 3,
    # Room for one of the two tiny models (each one's footprint is about 12 MB: weights,
    # activation reserve, minimum KV cache): every switch is a swap.
    "worker_memory_gb": 0.016,
}
COUNTERS = {
    "auto_loads": "warmserve_auto_loads_total",
    "evictions": "warmserve_evictions_total",
    "idle_unloads": "warmserve_idle_unloads_total",
    "loads": "warmserve_model_load_seconds_count",
    "load_seconds": "warmserve_model_load_seconds_sum",
    "unloads": "warmserve_model_unload_seconds_count",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_common_arguments(parser, "two tiny models, few requests (CI)")
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="SHAPE",
        help="one shape per model, a shape repeated for several models of it "
        f"(default {' '.join(FULL['models'])})",
    )
    parser.add_argument(
        "--popularity", type=float, nargs="+", help="weight per model (default N, N-1, ..., 1)"
    )
    parser.add_argument("--requests", type=int, help="in the trace (default 80)")
    parser.add_argument("--clients", type=int, help="of the concurrent phase (default 8)")
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second (default 4)")
    parser.add_argument("--input-len", type=int, help="prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, help="generated tokens (default 16)")
    parser.add_argument("--ideal-requests", type=int, help="timed per model alone (default 5)")
    parser.add_argument("--keep-alive", help="of every registered model (default 5m)")
    parser.add_argument("--worker-memory-gb", type=float, help="passed to `warmserve serve`")
    parser.add_argument("--gpu-memory-utilization", type=float, help="passed to `warmserve serve`")
    parser.add_argument(
        "--min-residency",
        type=float,
        default=ServerConfig.min_residency_s,
        help="passed to `warmserve serve`; each timed swap starts this long after the load "
        f"before it, so that no eviction it needs waits for it (default "
        f"{ServerConfig.min_residency_s:g})",
    )


def run(args: argparse.Namespace) -> int:
    options.apply_presets(args, FULL, QUICK)
    popularity = args.popularity or list(range(len(args.models), 0, -1))
    if len(popularity) != len(args.models):
        raise SystemExit("warmserve: error: --popularity needs one weight per model")
    device = options.resolve_device(args.device)
    root = Path(args.checkpoints)
    names = prepare_models(root, args.models, args.dtype or options.default_dtype(device))
    out = Path(args.out)
    registry = out / "trace-models.yaml"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(
        "models:\n"
        + "".join(
            f"  - name: {name}\n    path: trace/{name}\n    keep_alive: {args.keep_alive}\n"
            for name in names
        )
    )
    serve_args = ["--models", str(registry.resolve()), *options.quick_serve_args(args)]
    if args.worker_memory_gb is not None:
        serve_args += ["--worker-memory-gb", str(args.worker_memory_gb)]
    if args.gpu_memory_utilization is not None:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    serve_args += ["--min-residency", str(args.min_residency)]
    serve_args += args.serve_arg
    results: dict = {
        "command": "warmserve bench trace " + " ".join(sys.argv[3:]),
        "device": device,
        "models": dict(zip(names, args.models, strict=True)),
        "popularity": {
            name: weight / sum(popularity) for name, weight in zip(names, popularity, strict=True)
        },
        "serve_args": serve_args,
        "lengths": [args.input_len, args.output_len],
    }
    trace = build_trace(names, popularity, args)
    from warmserve.bench.swap import host_to_device_bandwidth  # torch: only once it runs

    results["h2d_gbps"] = host_to_device_bandwidth(device, 2**28 if args.quick else 2**30)
    weights = {name: trace_swaps.weights_bytes(root / "trace" / name) for name in names}
    with BenchServer(device, root.resolve(), serve_args, out / "trace-serve.log") as server:
        results.update(
            asyncio.run(measure(server.url, names, trace, weights, results["h2d_gbps"], args))
        )
    results["device"] = options.device_name(device)  # after the runs: see device_name
    results["targets"] = [
        {"target": name, "measured": measured, "met": met}
        for name, measured, met in targets(results)
    ]
    json_path = out / "trace.json"
    report.write_json(json_path, results)
    markdown = render_markdown(results)
    report.update_section(Path(args.markdown), "warmserve bench trace", markdown)
    print(markdown)
    print(f"wrote {json_path} and a section of {args.markdown}")
    return 0


def prepare_models(root: Path, shapes: list[str], dtype: str) -> list[str]:
    """One model folder per entry under root/trace, sharing its shape's files on disk."""
    from warmserve.bench.checkpoints import bench_checkpoint, share_checkpoint

    names = []
    for index, shape in enumerate(shapes):
        name = f"m{index}-{shape}"
        share_checkpoint(bench_checkpoint(root, shape, dtype), root / "trace" / name)
        names.append(name)
    return names


def build_trace(names: list[str], popularity: list[float], args) -> list[http_load.BenchRequest]:
    rng = random.Random(args.seed)
    models = rng.choices(names, weights=popularity, k=args.requests)
    return [
        http_load.BenchRequest(model, random_prompt(rng, args.input_len), args.output_len)
        for model in models
    ]


async def measure(url: str, names: list[str], trace, weights: dict, h2d_gbps: float, args) -> dict:
    async with http_load.http_client(url) as client, http_load.stream_session(url) as session:
        send = http_load.http_sender(session)
        ideal = {name: await alone(client, send, name, args) for name in names}
        phases = {}
        for phase, description, runner in (
            ("sequential", "1 client", lambda: http_load.run_clients(trace, send, 1)),
            (
                "clients",
                f"{args.clients} clients",
                lambda: http_load.run_clients(trace, send, args.clients),
            ),
            (
                "poisson",
                f"Poisson {args.rate:g} req/s",
                lambda: http_load.run_poisson(trace, send, args.rate, args.seed),
            ),
        ):
            before = await counters(client)
            run = await runner()
            after = await counters(client)
            phases[phase] = phase_figures(run, ideal, before, after)
            phases[phase]["description"] = description
            models = await admin_models(client)
            phases[phase]["admin_models_after"] = models
            phases[phase]["resident_after"] = [m["name"] for m in models if m["state"] == "loaded"]
            print(f"{description}: {phase_line(phases[phase])}", flush=True)
        swaps = await trace_swaps.measure_swaps(client, send, names, weights, h2d_gbps, args)
        # Beside the most popular model, the heaviest other one loads: the longest copy.
        loader = max(names[1:], key=lambda name: weights[name])
        beside = await trace_swaps.measure_load_beside_stream(
            client, send, names[0], loader, swaps[loader]["swap_s"], args
        )
        totals = await counters(client)
    return {
        "ideal": ideal,
        "phases": phases,
        "swaps": swaps,
        "load_beside_stream": beside,
        "counters_at_end": totals,
    }


async def alone(client, send: http_load.Sender, name: str, args) -> dict:
    """A model's warm latency with nothing else running: a first request loads it (timed as
    the load); once the server says the model is warm (its idle-gap work done, which a trace
    this long would otherwise pay for inside the ideal), one more request is not timed, then
    `ideal_requests` requests one at a time; their median is the ideal."""
    rng = random.Random(f"{args.seed}-{name}")

    def request() -> http_load.BenchRequest:
        return http_load.BenchRequest(name, random_prompt(rng, args.input_len), args.output_len)

    first = await send(request())
    warm_s = await http_load.wait_until_warm(client, name) if first.ok else None
    settling = await send(request())
    warm = [await send(request()) for _ in range(args.ideal_requests)]
    failed = [result for result in (first, settling, *warm) if not result.ok]
    if failed:
        raise RuntimeError(f"{name} alone failed: {failed[0].status} {failed[0].error}")
    return {
        "first_request_s": first.latency,
        "warm_s": warm_s,
        "ttft_s": statistics.median(result.ttft for result in warm),
        "latency_s": statistics.median(result.latency for result in warm),
    }


async def counters(client) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    totals = http_load.prometheus_totals(response.text, list(COUNTERS.values()))
    return {key: totals[metric] for key, metric in COUNTERS.items()}


async def admin_models(client) -> list[dict]:
    response = await client.get("/admin/models")
    response.raise_for_status()
    return response.json()


def phase_figures(run: http_load.LoadRun, ideal: dict, before: dict, after: dict) -> dict:
    figures = http_load.serving_metrics(run)
    done = [result for result in run.results if result.ok]
    ideal_sum = sum(ideal[result.request.model]["latency_s"] for result in done)
    figures["latency_over_ideal"] = (
        sum(result.latency for result in done) / ideal_sum if done else None
    )
    figures["ideal_latency_sum_s"] = ideal_sum
    figures.update({key: after[key] - before[key] for key in COUNTERS})
    figures["requests"] = [
        {
            "model": result.request.model,
            "status": result.status,
            "sent_at_s": result.sent_at,
            "ttft_s": result.ttft,
            "latency_s": result.latency,
        }
        for result in sorted(run.results, key=lambda result: result.sent_at)
    ]
    return figures


def phase_line(figures: dict) -> str:
    ratio = figures["latency_over_ideal"]
    return (
        f"{figures['completed']} done, refused {figures['failed_by_status'] or 0}, "
        f"{figures['auto_loads']:.0f} loads on demand, {figures['evictions']:.0f} evictions, "
        f"latency / ideal {report.number(ratio, 2)}"
    )

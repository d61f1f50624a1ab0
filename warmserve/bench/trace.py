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
an eviction or a queue.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path

from warmserve.bench import http_load, report
from warmserve.bench.server_process import BenchServer
from warmserve.bench.workloads import random_prompt

DEFAULT_MODELS = ["qwen3-0.6b", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-8b"]
QUICK = {  # two tiny models on one CPU worker, so that they swap; CI runs this
    "models": ["tiny", "tiny-opt"],
    "requests": 8,
    "clients": 2,
    "rate": 4.0,
    "input_len": 16,
    "output_len": 4,
    "ideal_requests": 3,
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
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="two tiny models, few requests (CI)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        metavar="SHAPE",
        help="one shape per model (repeat a shape for several models of it)",
    )
    parser.add_argument(
        "--popularity", type=float, nargs="+", help="weight per model (default N, N-1, ..., 1)"
    )
    parser.add_argument("--requests", type=int, default=80, help="in the trace")
    parser.add_argument("--clients", type=int, default=8, help="of the concurrent phase")
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--ideal-requests", type=int, default=5, help="timed per model alone")
    parser.add_argument("--keep-alive", default="5m", help="of every registered model")
    parser.add_argument("--dtype", help="of the built checkpoints (default: bfloat16 on a GPU)")
    parser.add_argument("--worker-memory-gb", type=float, help="passed to `warmserve serve`")
    parser.add_argument("--gpu-memory-utilization", type=float, help="passed to `warmserve serve`")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to `warmserve serve` (repeat; use --serve-arg=--flag for flags)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", default=".checkpoints/bench")
    parser.add_argument("--out", default="bench-results", help="folder for trace.json")
    parser.add_argument("--markdown", default="BENCHMARKS.md")


def run(args: argparse.Namespace) -> int:
    # Imported here: `warmserve ps` and the other client commands build this parser too.
    import torch

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    popularity = args.popularity or list(range(len(args.models), 0, -1))
    if len(popularity) != len(args.models):
        raise SystemExit("warmserve: error: --popularity needs one weight per model")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.checkpoints)
    names = prepare_models(root, args.models, args.dtype or default_dtype(device))
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
    serve_args = ["--models", str(registry.resolve())]
    if args.worker_memory_gb is not None:
        serve_args += ["--worker-memory-gb", str(args.worker_memory_gb)]
    if args.gpu_memory_utilization is not None:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.quick:
        serve_args += ["--workers", "1"]
    serve_args += args.serve_arg
    weights = dict(zip(names, popularity, strict=True))
    results: dict = {
        "command": "warmserve bench trace " + " ".join(sys.argv[3:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "models": dict(zip(names, args.models, strict=True)),
        "popularity": {name: weight / sum(popularity) for name, weight in weights.items()},
        "serve_args": serve_args,
    }
    trace = build_trace(names, popularity, args)
    log = out / "trace-serve.log"
    with BenchServer(device, root.resolve(), serve_args, log) as server:
        results.update(asyncio.run(measure(server.url, names, trace, args)))
    report.write_json(out / "trace.json", results)
    markdown = render_markdown(results, args)
    report.update_section(Path(args.markdown), "warmserve bench trace", markdown)
    print(markdown)
    return 0


def default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


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


async def measure(url: str, names: list[str], trace, args) -> dict:
    async with http_load.http_client(url) as client:
        send = http_load.http_sender(client)
        ideal = {name: await alone(send, name, args) for name in names}
        phases = {}
        for phase, runner in (
            ("sequential", lambda: http_load.run_clients(trace, send, 1)),
            (f"{args.clients} clients", lambda: http_load.run_clients(trace, send, args.clients)),
            (
                f"Poisson {args.rate:g}/s",
                lambda: http_load.run_poisson(trace, send, args.rate, args.seed),
            ),
        ):
            before = await counters(client)
            run = await runner()
            after = await counters(client)
            phases[phase] = phase_figures(run, ideal, before, after)
            phases[phase]["resident_after"] = await resident_models(client)
            print(f"{phase}: {phase_line(phases[phase])}", flush=True)
        totals = await counters(client)
    return {"ideal": ideal, "phases": phases, "counters_at_end": totals}


async def alone(send: http_load.Sender, name: str, args) -> dict:
    """A model's warm latency with nothing else running: a first request loads it (timed as
    the load), a second one is not timed (the first requests after a load still pay for lazy
    set-up), then `ideal_requests` requests one at a time; their median is the ideal."""
    rng = random.Random(f"{args.seed}-{name}")

    def request() -> http_load.BenchRequest:
        return http_load.BenchRequest(name, random_prompt(rng, args.input_len), args.output_len)

    first, settling = await send(request()), await send(request())
    warm = [await send(request()) for _ in range(args.ideal_requests)]
    failed = [result for result in (first, settling, *warm) if not result.ok]
    if failed:
        raise RuntimeError(f"{name} alone failed: {failed[0].status} {failed[0].error}")
    return {
        "first_request_s": first.latency,
        "ttft_s": statistics.median(result.ttft for result in warm),
        "latency_s": statistics.median(result.latency for result in warm),
    }


async def counters(client) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    totals = http_load.prometheus_totals(response.text, list(COUNTERS.values()))
    return {key: totals[metric] for key, metric in COUNTERS.items()}


async def resident_models(client) -> list[str]:
    response = await client.get("/admin/models")
    response.raise_for_status()
    return [model["name"] for model in response.json() if model["state"] == "loaded"]


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


def render_markdown(results: dict, args: argparse.Namespace) -> str:
    models = ", ".join(f"{name} ({share:.0%})" for name, share in results["popularity"].items())
    lines = [
        "## `warmserve bench trace`",
        "",
        f"Device: **{results['device']}**. Command: `{results['command']}`; server flags: "
        f"`{' '.join(results['serve_args'])}`. Models (popularity): {models}. "
        f"{args.requests} requests of {args.input_len} prompt / {args.output_len} output tokens "
        "(streaming `/v1/completions`, `ignore_eos`). *Latency / ideal*: the completed requests' "
        "summed latency over their models' warm latency alone, measured first on the same "
        "server. Latencies in ms as mean / median / p99.",
        "",
    ]
    rows = []
    for phase, figures in results["phases"].items():
        refused = ", ".join(
            f"{count} × {status}" for status, count in figures["failed_by_status"].items()
        )
        rows.append(
            [
                phase,
                figures["completed"],
                refused or "0",
                report.distribution(figures["ttft_ms"]),
                report.distribution(figures["e2el_ms"]),
                report.number(figures["latency_over_ideal"], 2),
                f"{figures['auto_loads']:.0f}",
                f"{figures['evictions']:.0f}",
                ", ".join(figures["resident_after"]) or "–",
            ]
        )
    header = ["phase", "completed", "refused", "TTFT", "E2E", "latency / ideal"]
    lines += [report.table([*header, "loads", "evictions", "resident after"], rows), ""]
    rows = [
        [
            name,
            report.number(figures["first_request_s"] * 1e3),
            report.number(figures["ttft_s"] * 1e3),
            report.number(figures["latency_s"] * 1e3),
        ]
        for name, figures in results["ideal"].items()
    ]
    lines += ["Each model alone (the ideal):", ""]
    lines.append(report.table(["model", "first request ms", "TTFT ms", "latency ms"], rows))
    return "\n".join(lines) + "\n"

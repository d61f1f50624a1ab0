"""`warmserve bench serve`'s report: the BENCHMARKS.md section of a run's results and issue 16's
targets against them."""

from __future__ import annotations

from warmserve.bench import report

# Issue 16's output-rate targets for 64 clients at 512 in / 128 out, by shape.
OUTPUT_RATE_TARGETS = {"llama-3.1-8b": 4000, "qwen3-0.6b": 15000}


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for each of issue 16's targets this run can check."""
    http, model = results["http"], results["model"]
    issue_lengths = results["fixed_lengths"] == [512, 128]
    rows = []
    at_64 = http.get("fixed concurrency 64")
    if at_64 and "comparison" in results:
        ratio = next(r for r in results["comparison"] if r["concurrency"] == 64)
        ratio = ratio["http_over_python_api"]
        measured = "–" if ratio is None else f"{ratio:.2f}x"
        met = ratio is not None and ratio >= 0.9
        rows.append(("64 clients: HTTP ≥ 0.9 × the Python API", measured, met))
    if at_64 and issue_lengths and model in OUTPUT_RATE_TARGETS:
        floor, rate = OUTPUT_RATE_TARGETS[model], at_64["output_throughput"]
        rows.append((f"64 clients: ≥ {floor:,} output tok/s", f"{rate:,.0f}", rate >= floor))
    alone = http.get("fixed concurrency 1")
    if alone and issue_lengths and model == "llama-3.1-8b":
        ttft = alone["ttft_ms"]["median"]
        rows.append(("1 client: TTFT median ≤ 25 ms", f"{ttft:.1f} ms", ttft <= 25))
    poisson = http.get("fixed rate 4")
    if poisson and issue_lengths and model == "llama-3.1-8b":
        p99 = poisson["ttft_ms"]["p99"]
        rows.append(("Poisson 4 req/s: TTFT p99 ≤ 100 ms", f"{p99:.1f} ms", p99 <= 100))
    constrained = http.get("fixed concurrency 64 json_schema")
    if at_64 and constrained:
        cost = 1 - constrained["output_throughput"] / at_64["output_throughput"]
        rows.append(("64 clients: json_schema mask costs ≤ 10 %", f"{cost:.1%}", cost <= 0.10))
    consistency = results.get("greedy_consistency")
    if consistency:
        rows.append(
            (
                f"greedy output alone = under {consistency['concurrent_streams']} concurrent "
                "streams",
                f"{consistency['equal']}/{consistency['compared']} equal",
                consistency["equal"] == consistency["compared"],
            )
        )
    for name, figures in http.items():
        itl = figures["itl_ms"]
        if " concurrency " in name and itl["median"]:
            ratio = itl["p99"] / itl["median"]
            rows.append((f"{name}: ITL p99 ≤ 3 × median", f"{ratio:.1f}x", ratio <= 3))
    return rows


def placed(results: dict) -> str:
    memory_bytes = results["load"].get("memory_bytes")  # runs before it was recorded lack it
    if memory_bytes is None:
        return ""
    return (
        f" and the model holds {report.number(memory_bytes / 2**30, 2)} GiB in "
        f"{results['dtype']} (weights, activations, the KV cache it always keeps)"
    )


def render_markdown(results: dict) -> str:
    input_len, output_len = results["fixed_lengths"]
    lines = [
        f"## `warmserve bench serve`: {results['model']}",
        "",
        f"Device: **{results['device']}**. Command: `{results['command']}`; server flags: "
        f"`{' '.join(results['serve_args']) or 'defaults'}`. Fixed lengths: {input_len} in / "
        f"{output_len} out; *sharegpt*: the seeded lognormal mix of "
        "`warmserve/bench/workloads.py`. Streaming `/v1/completions`, greedy, `ignore_eos`. "
        "Latencies in ms as mean / median / p99, defined as in `vllm bench serve`.",
        "",
        f"The load took {report.number(results['load']['load']['load_seconds'], 2)} s "
        f"({results['load']['load']['source']}){placed(results)}; the model was warm (its "
        "step kernels compiled and decode graphs captured in the worker's idle gaps) "
        f"{report.number(results['load']['warm_seconds'], 2)} s later, and the runs started "
        "then.",
        "",
    ]
    rows = []
    for name, figures in results["http"].items():
        failed = figures["failed"]
        rows.append(
            [
                name,
                f"{figures['completed']}" + (f" ({failed} failed)" if failed else ""),
                report.number(figures["request_throughput"], 2),
                report.number(figures["output_throughput"], 0),
                report.number(figures["total_token_throughput"], 0),
                report.distribution(figures["ttft_ms"]),
                report.distribution(figures["tpot_ms"], 2),
                report.distribution(figures["itl_ms"], 2),
                report.distribution(figures["e2el_ms"], 0),
            ]
        )
    header = ["run", "completed", "req/s", "output tok/s", "total tok/s", "TTFT", "TPOT"]
    lines += [report.table([*header, "ITL", "E2E"], rows), ""]
    streamed = {
        name: figures["server_output_tokens_per_cpu_s"]
        for name, figures in results["http"].items()
        if "server_output_tokens_per_cpu_s" in figures
    }
    if streamed:
        lines += [
            "Output tokens the server process streamed per second of its own CPU time (the rate "
            "one server process reaches when its CPU is the limit): "
            + ", ".join(f"{name} {report.number(rate, 0)}" for name, rate in streamed.items()),
            "",
        ]
    steps = {
        name: figures["engine_steps"]
        for name, figures in results["http"].items()
        if figures.get("engine_steps")
    }
    if steps:
        lines += [
            "Engine steps that yielded tokens, by kind, with their mean host time per step call "
            "(`warmserve_engine_step_seconds` in /metrics): "
            + "; ".join(
                f"{name}: "
                + ", ".join(
                    f"{kind} {entry['steps']:,.0f} × {entry['mean_ms']:.2f} ms"
                    for kind, entry in sorted(kinds.items())
                )
                for name, kinds in steps.items()
            ),
            "",
        ]
    client = {name: figures.get("client_cpu_per_s") for name, figures in results["http"].items()}
    if any(load is not None for load in client.values()):
        lines += [
            "CPU seconds per second that the benchmark's client process (every client, one "
            "Python process on aiohttp, as `vllm bench serve`) spent: near 1.0 the client, not "
            "the server, is the limit: "
            + ", ".join(f"{name} {report.number(load, 2)}" for name, load in client.items()),
            "",
        ]
    if "comparison" in results:
        lines += [
            "Same run, fixed lengths: the Python API (`Controller.generate` in-process, same "
            "requests, same concurrency) and the engine alone decoding a full batch of that size:",
            "",
        ]
        rows = [
            [
                row["concurrency"],
                report.number(row["http_output_throughput"], 0),
                report.number(row["python_api_output_throughput"], 0),
                report.number(row["http_over_python_api"], 2) + "x",
                report.number(row["engine_decode_tokens_per_s"], 0),
                report.number(row["http_ttft_median_ms"]),
                report.number(row["python_api_ttft_median_ms"]),
            ]
            for row in results["comparison"]
        ]
        header = ["clients", "HTTP output tok/s", "Python API output tok/s", "HTTP / API"]
        header += ["engine decode tok/s", "HTTP TTFT median ms", "API TTFT median ms"]
        lines += [report.table(header, rows), ""]
    lines += [
        "Targets (issue 16) this run can check:",
        "",
        report.targets_table(results["targets"]),
    ]
    return "\n".join(lines) + "\n"

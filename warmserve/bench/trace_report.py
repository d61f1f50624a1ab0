"""`warmserve bench trace`'s report: the BENCHMARKS.md section of a run's results and issue 15's
targets against them."""

from __future__ import annotations

from warmserve.bench import report
from warmserve.config import GIB


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for issue 15's targets that this run can check."""
    phases = results["phases"]
    rows = []
    for phase in ("clients", "poisson"):
        refused = phases[phase]["failed"]
        rows.append((f"{phases[phase]['description']}: 0 refused", str(refused), refused == 0))
    ratio = phases["sequential"]["latency_over_ideal"]
    # The target is for models that all fit: a trace that must evict swaps by design, and its
    # ratio (in the phase table) measures the swaps.
    if ratio is not None and not phases["sequential"].get("evictions"):
        rows.append(("sequential: ≤ 1.1 × all-resident ideal", f"{ratio:.2f}x", ratio <= 1.1))
    swaps = results["swaps"]
    worst = max(swaps.values(), key=lambda swap: swap["swap_s"] / swap["floor_s"])
    rows.append(
        (
            "each swap ≤ 1.15 × its copy floor + 15 ms",
            f"worst {worst['swap_s'] * 1e3:.1f} ms vs floor {worst['floor_s'] * 1e3:.1f} ms",
            all(swap["met"] for swap in swaps.values()),
        )
    )
    beside = results["load_beside_stream"]
    rows.append(
        (
            "ITL p99 while another model loads ≤ idle p99 + 50 ms",
            f"{report.number(beside['during_load_itl_p99_ms'])} ms vs idle "
            f"{report.number(beside['idle_itl_p99_ms'])} ms",
            beside["met"],
        )
    )
    if list(results["models"].values()) == ["llama-3.1-8b"] * 8:
        p99 = phases["clients"]["ttft_ms"]["p99"]
        met = p99 is not None and p99 <= 1000
        rows.append(("8 × 8B: TTFT p99 ≤ 1 s", f"{report.number(p99)} ms", met))
    return rows


def render_markdown(results: dict) -> str:
    models = ", ".join(f"{name} ({share:.0%})" for name, share in results["popularity"].items())
    input_len, output_len = results["lengths"]
    requests = len(results["phases"]["sequential"]["requests"])
    lines = [
        "## `warmserve bench trace`",
        "",
        f"Device: **{results['device']}**. Command: `{results['command']}`; server flags: "
        f"`{' '.join(results['serve_args'])}`. Models (popularity): {models}. "
        f"{requests} requests of {input_len} prompt / {output_len} output tokens "
        "(streaming `/v1/completions`, `ignore_eos`). *Latency / ideal*: the completed requests' "
        "summed latency over their models' warm latency alone, measured first on the same "
        "server. Latencies in ms as mean / median / p99.",
        "",
    ]
    rows = []
    for figures in results["phases"].values():
        refused = ", ".join(
            f"{count} × {status}" for status, count in figures["failed_by_status"].items()
        )
        rows.append(
            [
                figures["description"],
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
            report.number(figures["warm_s"]),
            report.number(figures["ttft_s"] * 1e3),
            report.number(figures["latency_s"] * 1e3),
        ]
        for name, figures in results["ideal"].items()
    ]
    lines += [
        "Each model alone (the ideal), timed once the server said it was warm (its step kernels "
        "compiled and decode graphs captured in the worker's idle gaps, *warm after*):",
        "",
    ]
    header = ["model", "first request ms", "warm after s", "TTFT ms", "latency ms"]
    lines += [report.table(header, rows), ""]
    rows = [
        [
            name,
            f"{swap['weights_bytes'] / GIB:.2f}",
            swap["load_source"] or "–",
            report.number(swap["floor_s"] * 1e3, 1),
            f"{report.number(swap['swap_s'] * 1e3, 1)} ({swap['swap_s'] / swap['floor_s']:.2f}x)",
            report.number(swap["load_seconds"] * 1e3 if swap["load_seconds"] else None, 1),
        ]
        for name, swap in results["swaps"].items()
    ]
    lines += [
        "Swaps: each model unloaded, then asked for a completion (`--min-residency` after the "
        "load before, so that an eviction it needs is not held back); the swap is that "
        f"request's TTFT. Copy floor: the weights over {results['h2d_gbps']:.1f} GB/s (pinned host to "
        "device, measured before the server started). *Load answered*: the server's "
        "`load_seconds` for that load (it answers once the weight copy is issued; the first "
        "step waits for the copy).",
        "",
        report.table(
            [
                "model",
                "GiB",
                "loaded from",
                "copy floor ms",
                "swap ms (x floor)",
                "load answered ms",
            ],
            rows,
        ),
        "",
    ]
    beside = results["load_beside_stream"]
    lines += [
        f"A load beside a stream: {beside['streamer']} streams {beside['stream_tokens']} tokens "
        f"while {beside['loader']} loads ({report.number(beside['load_s'] * 1e3)} ms from "
        f"{beside['load_source']}"
        + ("" if beside["loaded_alongside"] else ", its first token after the stream ended")
        + f"); {beside['gaps_during_load']} inter-token gaps overlap the load: p99 {report.number(beside['during_load_itl_p99_ms'])} ms, max "
        f"{report.number(beside['during_load_itl_max_ms'])} ms; alone its ITL p99 is "
        f"{report.number(beside['idle_itl_p99_ms'])} ms.",
        "",
    ]
    lines += [
        "Targets (issue 15) this run can check:",
        "",
        report.targets_table(results["targets"]),
    ]
    return "\n".join(lines) + "\n"

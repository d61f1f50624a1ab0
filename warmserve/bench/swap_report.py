"""`warmserve bench`'s report: the BENCHMARKS.md section of a run's results and issue 11's targets
against them."""

from __future__ import annotations

from warmserve.config import GIB


def render_markdown(results: dict) -> str:
    lines = [
        "## `warmserve bench`: swap, load and decode",
        "",
        f"Device: **{results['device']}**. Command: `{results['command']}`.",
        f"Pinned host-to-device copy: {results['h2d_gbps']:.1f} GB/s; device memory copy: "
        f"{results['memory_gbps']:.0f} GB/s (both measured in this run). Times are medians "
        "(min in brackets) over the repeats.",
        "",
        "| shape | GiB | copy floor ms | swap ms (x floor) | host-cache load ms | unload ms "
        "| first token after load ms | hand-written swap ms | disk load GB/s (read GB/s, cache) "
        "| fresh transformers s | memory after unload − idle MiB (released after s) "
        "| output same after swaps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, entry in results["shapes"].items():
        w = entry["warmserve"]
        floor_ms = entry["floor_s"] * 1e3
        hand = entry.get("handwritten", {}).get("load_first_token_s")
        fresh = entry.get("fresh_transformers_s")
        cells = [
            shape,
            f"{entry['bytes'] / GIB:.2f}",
            f"{floor_ms:.1f}",
            f"{_ms(w['swap_s'])} ({w['swap_s']['median'] * 1e3 / floor_ms:.2f}x)",
            _ms(w["load_host_cache_s"]),
            _ms(w["unload_s"]),
            _ms(w["first_token_s"]),
            _ms(hand) if hand else "–",
            f"{entry['disk_load_gbps']:.2f} ({entry['disk_read_gbps']:.2f}, "
            f"{entry['disk_page_cache']})",
            f"{fresh:.1f}" if fresh else "–",
            f"{(w['memory_after_unload_bytes'] - w['memory_idle_bytes']) / 2**20:.1f} "
            f"({w['memory_released_after_s']:.2f})",
            str(w["output_unchanged_after_swaps"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Decode (greedy, one token per sequence per step, prompts of the context length):",
        "",
        "| shape | batch | warmserve step ms | tokens/s | memory floor ms (x floor) "
        "| transformers step ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, entry in results["shapes"].items():
        for batch, decode in entry["decode"].items():
            reference = entry["transformers_decode"][batch]
            lines.append(
                f"| {shape} | {batch} | {decode['step_ms']:.2f} | {decode['tokens_per_s']:.0f} "
                f"| {decode['memory_floor_ms']:.2f} "
                f"({decode['step_ms'] / decode['memory_floor_ms']:.2f}x) "
                f"| {reference['step_ms']:.2f} | {reference['step_ms'] / decode['step_ms']:.1f}x |"
            )
    lines += ["", "Targets (issue 11), each against this run's own baselines:", ""]
    lines += ["| target | measured | |", "|---|---|---|"]
    lines += [
        f"| {name} | {measured} | {'met' if met else 'missed'} |"
        for name, measured, met in targets(results)
    ]
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for every target that this run's shapes allow."""
    rows = []
    for shape, entry in results["shapes"].items():
        w = entry["warmserve"]
        floor_ms = entry["floor_s"] * 1e3
        swap_ms = w["swap_s"]["median"] * 1e3
        bound = 1.15 * floor_ms + 15
        rows.append(
            (
                f"swap ≤ 1.15 × floor + 15 ms, {shape}",
                f"{swap_ms:.1f} vs {bound:.1f} ms",
                swap_ms <= bound,
            )
        )
        hand = entry.get("handwritten", {}).get("load_first_token_s")
        if hand:
            hand_ms = hand["median"] * 1e3
            rows.append(
                (
                    f"swap faster than hand-written, {shape}",
                    f"{swap_ms:.1f} vs {hand_ms:.1f} ms",
                    swap_ms < hand_ms,
                )
            )
        unload_ms = w["unload_s"]["median"] * 1e3
        rows.append((f"unload ≤ 20 ms, {shape}", f"{unload_ms:.1f} ms", unload_ms <= 20))
        share = entry["disk_load_gbps"] / entry["disk_read_gbps"]
        rows.append(
            (
                f"disk load ≥ 80 % of read bandwidth, {shape}",
                f"{share:.0%} ({entry['disk_load_gbps']:.2f} of {entry['disk_read_gbps']:.2f} GB/s, {entry['disk_page_cache']})",
                share >= 0.8,
            )
        )
        extra_mib = (w["memory_after_unload_bytes"] - w["memory_idle_bytes"]) / 2**20
        rows.append(
            (
                f"memory after unload within 64 MiB of idle, {shape}",
                f"{extra_mib:.1f} MiB",
                extra_mib <= 64,
            )
        )
        decode = {int(batch): value for batch, value in entry["decode"].items()}
        reference = {int(batch): value for batch, value in entry["transformers_decode"].items()}
        if 64 in decode:
            speedup = reference[64]["step_ms"] / decode[64]["step_ms"]
            rows.append(
                (
                    f"batch-64 throughput ≥ 10 × transformers generate, {shape}",
                    f"{speedup:.1f}x",
                    speedup >= 10,
                )
            )
        if shape == "llama-3.1-8b":
            for batch in (1, 64):
                ratio = decode[batch]["step_ms"] / decode[batch]["memory_floor_ms"]
                rows.append(
                    (
                        f"Llama-3.1-8B decode step ≤ 1.3 × memory floor, batch {batch}",
                        f"{ratio:.2f}x ({decode[batch]['step_ms']:.2f} ms)",
                        ratio <= 1.3,
                    )
                )
        if shape == "qwen3-0.6b":
            step = decode[1]["step_ms"]
            rows.append(
                ("Qwen3-0.6B batch-1 time per token ≤ 1.5 ms", f"{step:.2f} ms", step <= 1.5)
            )
    return rows


def _ms(samples: dict) -> str:
    return f"{samples['median'] * 1e3:.1f} [{samples['min'] * 1e3:.1f}]"

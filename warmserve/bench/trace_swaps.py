"""`bench trace`'s last two phases: what one swap costs against its copy floor, and what a load
does to a model that streams beside it on the same GPU.

*Swaps*: each model in turn is unloaded through the admin API, then asked for a completion;
that request's time to first token is the swap (load from wherever the server finds the
weights, evictions to make room, prefill, first token), set against the copy floor of the
model's weights: their bytes over the pinned host-to-device bandwidth measured by this process
before the server started. Issue 11 bounds a swap by 1.15 × its floor + 15 ms.

*Load beside a stream*: the most popular model streams a long completion alone (its idle
inter-token latencies), then again while another model, unloaded first, is asked for a
completion and so loads on the same GPU. The inter-token gaps that overlap that load are set
against the idle ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np

from warmserve.bench import http_load
from warmserve.bench.workloads import random_prompt

SWAP_SLACK_S = 0.015  # issue 11's bound: a swap within 1.15 x its copy floor + 15 ms
LOAD_ITL_SLACK_MS = 50.0  # issue 15's bound: ITL p99 during a load within 50 ms of idle p99


def weights_bytes(checkpoint: Path) -> int:
    return sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))


async def unload_if_resident(client, name: str) -> None:
    response = await client.get("/admin/models")
    response.raise_for_status()
    if any(m["name"] == name and m["state"] == "loaded" for m in response.json()):
        (await client.delete(f"/admin/models/{name}")).raise_for_status()


async def model_entry(client, name: str) -> dict:
    response = await client.get("/admin/models")
    response.raise_for_status()
    return next(m for m in response.json() if m["name"] == name)


async def measure_swaps(client, send, names, weights: dict, h2d_gbps: float, args) -> dict:
    rng = random.Random(f"{args.seed}-swaps")
    swaps = {}
    for name in names:
        await unload_if_resident(client, name)
        # The model the last swap loaded may have to go for this one: past its minimum
        # residency, the swap times the unload and the load, not the policy's wait.
        await asyncio.sleep(args.min_residency)
        result = await send(
            http_load.BenchRequest(name, random_prompt(rng, args.input_len), args.output_len)
        )
        if not result.ok:
            raise RuntimeError(f"swap to {name} failed: {result.status} {result.error}")
        entry = await model_entry(client, name)
        floor_s = weights[name] / (h2d_gbps * 1e9)
        swaps[name] = {
            "swap_s": result.ttft,
            "floor_s": floor_s,
            "weights_bytes": weights[name],
            "load_source": entry["load_source"],
            "load_seconds": entry["load_seconds"],
            "met": result.ttft <= 1.15 * floor_s + SWAP_SLACK_S,
        }
        print(
            f"swap to {name}: {result.ttft * 1e3:.1f} ms, copy floor {floor_s * 1e3:.1f} ms, "
            f"from {entry['load_source']}",
            flush=True,
        )
    return swaps


def chunk_times(result: http_load.RequestResult, started: float) -> list[float]:
    """When each of a stream's chunks arrived, from its first-token time and its gaps."""
    times = [started + result.ttft]
    for gap in result.itl:
        times.append(times[-1] + gap)
    return times


def gaps_overlapping(times: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False) if b > start and a < end]


def p99_ms(gaps: list[float]) -> float | None:
    return float(np.percentile(np.asarray(gaps) * 1e3, 99)) if gaps else None


async def measure_load_beside_stream(
    client, send, streamer: str, loader: str, loader_swap_s: float, args
) -> dict:
    """`loader_swap_s`: what the loader's swap took (measure_swaps); the stream is made long
    enough to outlast the load about four times over, so that the load falls inside it."""
    rng = random.Random(f"{args.seed}-beside")

    def request(model: str, output_len: int) -> http_load.BenchRequest:
        return http_load.BenchRequest(model, random_prompt(rng, args.input_len), output_len)

    await send(request(streamer, args.output_len))  # resident and warm
    probe = await send(request(streamer, 128))
    itl_s = float(np.median(probe.itl)) if probe.itl else 0.01
    room = (await model_entry(client, streamer))["max_model_len"] - args.input_len - 1
    long_len = max(128, min(room, int(4 * loader_swap_s / itl_s)))
    idle = await send(request(streamer, long_len))
    await unload_if_resident(client, loader)
    started = time.perf_counter()
    stream = asyncio.create_task(send(request(streamer, long_len)))
    # Into the stream's steady part before the other model is asked for.
    await asyncio.sleep(idle.ttft + 0.25 * (idle.latency - idle.ttft))
    load_started = time.perf_counter()
    loaded = await send(request(loader, args.output_len))
    load_ended = load_started + loaded.ttft
    beside = await stream
    for result in (idle, beside, loaded):
        if not result.ok:
            raise RuntimeError(f"load beside a stream failed: {result.status} {result.error}")
    times = chunk_times(beside, started)
    # A load whose first token came after the stream's last: nothing ran beside the stream.
    alongside = load_ended < times[-1]
    during = gaps_overlapping(times, load_started, load_ended) if alongside else []
    idle_p99, during_p99 = p99_ms(idle.itl), p99_ms(during)
    return {
        "streamer": streamer,
        "loader": loader,
        "stream_tokens": long_len,
        "load_s": loaded.ttft,
        "load_source": (await model_entry(client, loader))["load_source"],
        "loaded_alongside": alongside,
        "gaps_during_load": len(during),
        "idle_itl_p99_ms": idle_p99,
        "during_load_itl_p99_ms": during_p99,
        "during_load_itl_max_ms": max(during) * 1e3 if during else None,
        # Without a gap during the load there is nothing to compare: not met.
        "met": during_p99 is not None and during_p99 <= idle_p99 + LOAD_ITL_SLACK_MS,
    }

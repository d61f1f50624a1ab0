"""Load generation and the figures `vllm bench serve` reports, shared by `bench serve` and
`bench trace`.

A request is sent by a *sender*: streaming `/v1/completions` over HTTP, or the in-process
`Controller.generate`; both time the same events, so their figures compare. The definitions
are those of vLLM's `benchmark_serving`: TTFT is the time to the first streamed chunk, ITL the
gaps between later chunks, TPOT (E2E latency - TTFT) / (output tokens - 1) per request (the
first token excluded), E2E latency from send to the last byte; throughput counts completed
requests over the run's wall time.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from warmserve.config import ServerConfig

REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BenchRequest:
    model: str
    prompt_token_ids: list[int]
    output_len: int
    response_format: dict | None = None  # OpenAI's field: output constrained by a grammar


@dataclass
class RequestResult:
    request: BenchRequest
    # "ok", the HTTP status of a refusal ("503"), or "error: <kind>" for a broken exchange.
    status: str = "ok"
    sent_at: float = 0.0  # seconds since the run started
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    chunks: int = 0
    itl: list[float] = field(default_factory=list)
    text: str = ""  # the streamed output (HTTP), for comparing greedy runs
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


Sender = Callable[[BenchRequest], Awaitable[RequestResult]]


class ChunkClock:
    """Times a stream's chunks as vLLM's client does."""

    def __init__(self, result: RequestResult):
        self.result = result
        self.started = self.last = time.perf_counter()

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.result.chunks == 0:
            self.result.ttft = now - self.started
        else:
            self.result.itl.append(now - self.last)
        self.result.chunks += 1
        self.last = now

    def finish(self) -> RequestResult:
        self.result.latency = time.perf_counter() - self.started
        return self.result


def http_sender(session: aiohttp.ClientSession) -> Sender:
    """Streams `/v1/completions` (greedy, `ignore_eos`, the prompt as token ids so its length is
    exact); the output token count comes from the usage chunk. The client is aiohttp, as in
    `vllm bench serve`: httpx spends about a millisecond more of the client's time on each
    request, which a TTFT would count against the server."""

    async def send(request: BenchRequest) -> RequestResult:
        result = RequestResult(request)
        body = {
            "model": request.model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.response_format is not None:
            body["response_format"] = request.response_format
        clock = ChunkClock(result)
        try:
            async with session.post("/v1/completions", json=body) as response:
                if response.status != 200:
                    result.status = str(response.status)
                    result.error = (await response.read()).decode(errors="replace")[:300]
                    return clock.finish()
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[len("data:") :])
                    if data.get("choices"):
                        clock.chunk()
                        result.text += data["choices"][0].get("text") or ""
                    # Usage may ride on a chunk with choices (vLLM's continuous usage stats).
                    if data.get("usage"):
                        result.output_tokens = data["usage"]["completion_tokens"]
                    if "error" in data:
                        result.status = "error: in stream"
                        result.error = str(data["error"])[:300]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result.status = f"error: {type(exc).__name__}"
            result.error = str(exc)[:300]
        return clock.finish()

    return send


def controller_sender(controller) -> Sender:
    """`Controller.generate` in this process: the Python API's figure for the same request."""
    from warmserve.config import SamplingParams

    async def send(request: BenchRequest) -> RequestResult:
        result = RequestResult(request)
        params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
        clock = ChunkClock(result)
        try:
            async for chunk in controller.generate(request.model, request.prompt_token_ids, params):
                if chunk.token_ids:
                    clock.chunk()
                result.output_tokens = chunk.completion_tokens
        except Exception as exc:  # a refusal or a failure is counted, not raised
            result.status = f"error: {type(exc).__name__}"
            result.error = str(exc)[:300]
        return clock.finish()

    return send


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration: float


async def run_clients(requests: Sequence[BenchRequest], send: Sender, clients: int) -> LoadRun:
    """`clients` closed-loop clients: each sends the trace's next request when its last one is
    answered (one client is a sequential trace)."""
    queue = list(reversed(requests))
    results: list[RequestResult] = []
    started = time.perf_counter()

    async def client() -> None:
        while queue:
            request = queue.pop()
            sent_at = time.perf_counter() - started
            result = await send(request)
            result.sent_at = sent_at
            results.append(result)

    await asyncio.gather(*(client() for _ in range(clients)))
    return LoadRun(results, time.perf_counter() - started)


async def run_poisson(
    requests: Sequence[BenchRequest], send: Sender, rate: float, seed: int
) -> LoadRun:
    """Open loop: requests arrive as a Poisson process of `rate` per second (seeded), whatever
    is still running, as `vllm bench serve --request-rate` sends them."""
    gaps = random.Random(seed)
    started = time.perf_counter()
    arrival = 0.0

    async def timed(request: BenchRequest, sent_at: float) -> RequestResult:
        result = await send(request)
        result.sent_at = sent_at
        return result

    tasks = []
    for request in requests:
        delay = arrival - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(request, time.perf_counter() - started)))
        arrival += gaps.expovariate(rate)
    results = await asyncio.gather(*tasks)
    return LoadRun(list(results), time.perf_counter() - started)


def distribution_ms(seconds: Sequence[float]) -> dict:
    if not seconds:
        return {"mean": None, "median": None, "p99": None}
    values = np.asarray(seconds) * 1e3
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
    }


def serving_metrics(run: LoadRun) -> dict:
    """What `vllm bench serve` prints for a run, plus refusals by status."""
    done = [result for result in run.results if result.ok]
    input_tokens = sum(len(result.request.prompt_token_ids) for result in done)
    output_tokens = sum(result.output_tokens for result in done)
    tpots = [
        (result.latency - result.ttft) / (result.output_tokens - 1)
        for result in done
        if result.output_tokens > 1
    ]
    chunks = sum(result.chunks for result in done)
    return {
        "completed": len(done),
        "failed": len(run.results) - len(done),
        "failed_by_status": dict(Counter(r.status for r in run.results if not r.ok)),
        "first_errors": sorted({r.error for r in run.results if not r.ok})[:3],
        "duration_s": run.duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / run.duration,
        "output_throughput": output_tokens / run.duration,
        "total_token_throughput": (input_tokens + output_tokens) / run.duration,
        "ttft_ms": distribution_ms([result.ttft for result in done]),
        "tpot_ms": distribution_ms(tpots),
        "itl_ms": distribution_ms([gap for result in done for gap in result.itl]),
        "e2el_ms": distribution_ms([result.latency for result in done]),
        # Above 1, a stream carried several tokens in a chunk: its ITL then counts that gap once.
        "tokens_per_chunk": output_tokens / chunks if chunks else None,
    }


def _samples(text: str):
    """Every sample of a Prometheus text exposition, with its family's name."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield family.name, sample


def prometheus_totals(text: str, names: Sequence[str]) -> dict[str, float]:
    """The sum over label sets of each named sample (as the exposition spells it)."""
    totals = dict.fromkeys(names, 0.0)
    for _, sample in _samples(text):
        if sample.name in totals:
            totals[sample.name] += sample.value
    return totals


def engine_step_totals(text: str) -> dict[str, tuple[float, float]]:
    """Per step kind: (steps, seconds) of `warmserve_engine_step_seconds`, over every model."""
    totals: dict[str, list[float]] = {}
    for family, sample in _samples(text):
        if family != "warmserve_engine_step_seconds":
            continue
        field = {"_count": 0, "_sum": 1}.get(sample.name.removeprefix(family))
        if field is not None:
            totals.setdefault(sample.labels["kind"], [0.0, 0.0])[field] += sample.value
    return {kind: (steps, seconds) for kind, (steps, seconds) in totals.items()}


def step_deltas(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, dict]:
    """Per step kind, the steps run between two engine_step_totals and their mean time."""
    deltas = {}
    for kind, (steps, seconds) in after.items():
        steps_before, seconds_before = before.get(kind, (0.0, 0.0))
        if steps > steps_before:
            count = steps - steps_before
            deltas[kind] = {"steps": count, "mean_ms": (seconds - seconds_before) / count * 1e3}
    return deltas


def stream_session(url: str) -> aiohttp.ClientSession:
    """The session the timed requests go through (see http_sender)."""
    # No connection limit: an open-loop run may hold any number of streams at once. Idle
    # connections are dropped before the server drops them: a request sent on one the server
    # was closing failed as "Server disconnected" (1 of 80 in a Poisson run after 64 clients
    # had left 64 connections idle; aiohttp keeps them 15 s by default).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=ServerConfig.http_keep_alive_s / 2)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    return aiohttp.ClientSession(url, connector=connector, timeout=timeout)


def http_client(url: str) -> httpx.AsyncClient:
    """For the benchmark's own calls (admin API, metrics), which are not timed."""
    # No pool limit: an open-loop run may hold any number of streams at once.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits)


async def wait_until_warm(client: httpx.AsyncClient, name: str, timeout_s: float = 300.0) -> float:
    """Waits until the server says that `name`'s idle-gap work is done (its step kernels
    compiled, its decode graphs captured: `warm_seconds` in /admin/models); returns how long
    that took after its load. Timing a model before then times that work."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get("/admin/models")
        response.raise_for_status()
        entry = next((m for m in response.json() if m["name"] == name), None)
        if entry is not None and entry.get("warm_seconds") is not None:
            return entry["warm_seconds"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not warm {timeout_s:.0f} s after its load: {entry}")
        await asyncio.sleep(0.05)

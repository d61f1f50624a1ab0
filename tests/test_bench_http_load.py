"""The serving benchmarks' arithmetic and load patterns, without a server: figures as vLLM's
`benchmark_serving` defines them, Prometheus scraping, seeded length mixes, and the tokenizer
that makes every generated token a streamed chunk."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest
from aiohttp import web

from warmserve.bench.checkpoints import SPECIAL_TOKENS, word_level_tokenizer
from warmserve.bench.http_load import (
    BenchRequest,
    LoadRun,
    RequestResult,
    http_sender,
    prometheus_totals,
    run_clients,
    run_poisson,
    serving_metrics,
    stream_session,
)
from warmserve.bench.workloads import MAX_INPUT_LEN, MAX_TOTAL_LEN, sharegpt_like_lengths


def result(prompt_len, output_tokens, ttft, latency, itl, status="ok") -> RequestResult:
    request = BenchRequest("m", [5] * prompt_len, output_tokens)
    return RequestResult(
        request,
        status=status,
        ttft=ttft,
        latency=latency,
        output_tokens=output_tokens if status == "ok" else 0,
        chunks=len(itl) + 1 if status == "ok" else 0,
        itl=itl,
    )


def test_serving_metrics_follow_vllm_definitions():
    run = LoadRun(
        [
            result(10, 5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
            result(20, 3, ttft=0.2, latency=0.6, itl=[0.1, 0.3]),
            result(30, 0, ttft=0.0, latency=0.01, itl=[], status="503"),
            result(30, 0, ttft=0.0, latency=0.01, itl=[], status="503"),
            result(30, 0, ttft=0.0, latency=0.01, itl=[], status="error: ReadTimeout"),
        ],
        duration=2.0,
    )
    figures = serving_metrics(run)
    assert figures["completed"] == 2 and figures["failed"] == 3
    assert figures["failed_by_status"] == {"503": 2, "error: ReadTimeout": 1}
    assert figures["total_input_tokens"] == 30  # completed requests only
    assert figures["total_output_tokens"] == 8
    assert figures["request_throughput"] == pytest.approx(1.0)
    assert figures["output_throughput"] == pytest.approx(4.0)
    assert figures["total_token_throughput"] == pytest.approx(19.0)
    # TPOT leaves the first token out: (0.5 - 0.1) / 4 and (0.6 - 0.2) / 2.
    assert figures["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)
    assert figures["ttft_ms"]["median"] == pytest.approx(150)
    assert figures["itl_ms"]["mean"] == pytest.approx(800 / 6)  # every gap of every stream
    assert figures["e2el_ms"]["mean"] == pytest.approx(550)
    assert figures["tokens_per_chunk"] == pytest.approx(8 / 8)


def test_serving_metrics_of_a_run_where_everything_failed():
    figures = serving_metrics(LoadRun([result(4, 0, 0, 0.01, [], status="503")], duration=1.0))
    assert figures["completed"] == 0 and figures["failed_by_status"] == {"503": 1}
    assert figures["ttft_ms"] == {"mean": None, "median": None, "p99": None}
    assert figures["tokens_per_chunk"] is None


def test_prometheus_totals_sum_label_sets_of_exact_names():
    text = "\n".join(
        [
            "# HELP warmserve_auto_loads_total Registered models loaded on demand",
            "# TYPE warmserve_auto_loads_total counter",
            "warmserve_auto_loads_total 3.0",
            "warmserve_auto_loads_created 1.7e9",
            'warmserve_model_load_seconds_count{source="disk"} 2.0',
            'warmserve_model_load_seconds_count{source="host-cache"} 5.0',
        ]
    )
    totals = prometheus_totals(
        text,
        [
            "warmserve_auto_loads_total",
            "warmserve_model_load_seconds_count",
            "warmserve_evictions_total",
        ],
    )
    assert totals == {
        "warmserve_auto_loads_total": 3.0,
        "warmserve_model_load_seconds_count": 7.0,
        "warmserve_evictions_total": 0.0,
    }


def test_sharegpt_like_lengths_are_seeded_and_within_bounds():
    lengths = sharegpt_like_lengths(500, seed=3, max_model_len=1500)
    assert lengths == sharegpt_like_lengths(500, seed=3, max_model_len=1500)
    assert lengths != sharegpt_like_lengths(500, seed=4, max_model_len=1500)
    for input_len, output_len in lengths:
        assert 4 <= input_len <= MAX_INPUT_LEN and output_len >= 4
        assert input_len + output_len <= min(MAX_TOTAL_LEN, 1500)
    assert len({length for length, _ in lengths}) > 100  # a mix, not a few values


def test_closed_loop_clients_bound_the_requests_in_flight():
    in_flight, most = 0, 0

    async def send(request: BenchRequest) -> RequestResult:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return RequestResult(request)

    requests = [BenchRequest("m", [3, 4], 1) for _ in range(20)]
    run = asyncio.run(run_clients(requests, send, clients=3))
    assert len(run.results) == 20 and most == 3


def test_poisson_arrivals_send_every_request_without_waiting_for_answers():
    in_flight, most = 0, 0

    async def send(request: BenchRequest) -> RequestResult:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)  # far longer than the mean gap of 1 ms
        in_flight -= 1
        return RequestResult(request)

    requests = [BenchRequest("m", [3], 1) for _ in range(10)]
    run = asyncio.run(run_poisson(requests, send, rate=1000.0, seed=0))
    assert len(run.results) == 10 and most > 1
    assert [r.sent_at for r in run.results] == sorted(r.sent_at for r in run.results)


def test_every_id_of_the_bench_tokenizer_decodes_to_text():
    tokenizer = word_level_tokenizer(128256)
    assert tokenizer.get_vocab_size() == 128256
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    # The printable ASCII characters follow the special tokens, one id each, then the words.
    characters = 127 - 32
    assert tokenizer.decode([3 + ord("{") - 32]) == "{"
    for token_id in (3 + characters, 1000, 128255):
        assert tokenizer.decode([token_id]) == f"w{token_id}"


def sse(*events: dict) -> bytes:
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode() + (
        b"data: [DONE]\n\n"
    )


def send_to(status: int, content: bytes) -> tuple[RequestResult, dict]:
    """Sends one request to a fake server (on a local port) answering `status` and `content`;
    returns the result and the request body the server saw."""
    seen = {}

    async def answer(request: web.Request) -> web.Response:
        seen.update(await request.json())
        return web.Response(status=status, body=content)

    async def go() -> RequestResult:
        app = web.Application()
        app.router.add_post("/v1/completions", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        try:
            async with stream_session(f"http://127.0.0.1:{port}") as session:
                return await http_sender(session)(BenchRequest("m", [7, 8, 9], 3))
        finally:
            await runner.cleanup()

    return asyncio.run(go()), seen


def test_http_sender_times_each_chunk_and_reads_the_usage():
    text = {"choices": [{"text": " w5", "index": 0}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    result, body = send_to(200, sse(text, text, text, usage))
    assert result.ok and result.chunks == 3 and result.output_tokens == 3
    assert len(result.itl) == 2 and 0 < result.ttft <= result.latency
    assert body["prompt"] == [7, 8, 9] and body["max_tokens"] == 3
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_http_sender_counts_refusals_and_stream_errors_by_status():
    refused, _ = send_to(503, b'{"error": {"message": "queue full", "code": "overloaded"}}')
    assert refused.status == "503" and "queue full" in refused.error
    broken, _ = send_to(200, sse({"error": {"message": "worker died", "code": "internal_error"}}))
    assert broken.status == "error: in stream" and "worker died" in broken.error


def test_building_the_cli_parser_imports_no_torch():
    """Every command (`serve` among them) builds the parser with the benchmarks' options; only
    running a benchmark may import torch."""
    code = "import sys, warmserve.cli as cli; cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"

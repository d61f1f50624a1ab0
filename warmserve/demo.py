"""`warmserve demo`: load, swap and reload two tiny models through the HTTP API, timing each step.

The server runs in this process (one torch import fewer than a subprocess) on a free port; the
demo talks to it over HTTP like any client would.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx

from warmserve.client import ServerError, describe_error
from warmserve.text_tables import format_table

# (name, architecture family): two families, so the swap changes the model's code path too.
DEMO_MODELS = (("demo-a", "qwen3"), ("demo-b", "llama"))
PROMPT = "The weather today is"
MAX_TOKENS = 12
HEALTH_TIMEOUT_S = 30.0


def progress(message: str) -> None:
    print(f"... {message}", flush=True)


def run_demo_in_process(checkpoint_dir: str) -> int:
    try:
        asyncio.run(_demo(Path(checkpoint_dir)))
    except ServerError as exc:
        print(f"warmserve demo: error: {exc}")
        return 1
    return 0


async def _demo(directory: Path) -> None:
    from warmserve.api.gateway import serve_gateway
    from warmserve.api.server import bind_socket
    from warmserve.config import ServerConfig
    from warmserve.controller.controller import Controller
    from warmserve.testing.checkpoints import ensure_checkpoint

    progress(f"preparing the demo checkpoints in {directory}/")
    for name, family in DEMO_MODELS:
        ensure_checkpoint(directory / name, family)

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = replace(ServerConfig(device="auto", model_root=str(directory.resolve())), port=port)
    progress("starting the pre-warmed worker pool (device auto)")
    started = time.perf_counter()
    async with Controller(config) as controller:
        pool_seconds = time.perf_counter() - started
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve_gateway(controller, config, sock, stop, access_log=False)
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                await _wait_until_healthy(http)
                rows, texts = await _swap_models(http)
        finally:
            stop.set()
            await server
    sock.close()
    _print_report(pool_seconds, rows, texts)


async def _wait_until_healthy(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if (await http.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise ServerError("the demo server did not become healthy")


async def _swap_models(http: httpx.AsyncClient) -> tuple[list[tuple[str, str, str]], list]:
    (first, _), (second, _) = DEMO_MODELS
    rows, texts = [], []

    async def generate(name: str) -> None:
        seconds, text = await _first_token_and_text(http, name)
        rows.append((f"first token {name}", "", f"{seconds:.3f}"))
        texts.append((name, text))

    progress(f"loading {first} from disk")
    loaded = await _request(http, "POST", "/admin/models", json={"name": first, "path": first})
    rows.append((f"load {first}", loaded["source"], f"{loaded['load_seconds']:.3f}"))
    await generate(first)

    progress(f"swapping {first} -> {second}")
    swap_started = time.perf_counter()
    unloaded = await _request(http, "DELETE", f"/admin/models/{first}")
    loaded = await _request(http, "POST", "/admin/models", json={"name": second, "path": second})
    swap_seconds = time.perf_counter() - swap_started
    rows.append(
        (
            f"swap {first} -> {second}",
            loaded["source"],
            f"{swap_seconds:.3f}  (unload {unloaded['unload_seconds']:.3f} s, "
            f"load {loaded['load_seconds']:.3f} s)",
        )
    )
    await generate(second)

    progress(f"loading {first} again")
    loaded = await _request(http, "POST", "/admin/models", json={"name": first, "path": first})
    rows.append((f"reload {first}", loaded["source"], f"{loaded['load_seconds']:.3f}"))
    await generate(first)
    return rows, texts


async def _request(http: httpx.AsyncClient, method: str, path: str, **kwargs) -> dict:
    response = await http.request(method, path, **kwargs)
    if not response.is_success:
        raise ServerError(describe_error(response))
    return response.json()


async def _first_token_and_text(http: httpx.AsyncClient, model: str) -> tuple[float, str]:
    """Streams a greedy completion; returns the seconds to the first event and the whole text."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first_token_seconds = None
    pieces = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if not response.is_success:
            await response.aread()
            raise ServerError(describe_error(response))
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise ServerError(event["error"]["message"])
            if first_token_seconds is None:
                first_token_seconds = time.perf_counter() - started
            pieces.extend(choice["text"] for choice in event["choices"])
    return first_token_seconds or 0.0, "".join(pieces)


def _print_report(pool_seconds: float, rows: list[tuple[str, str, str]], texts: list) -> None:
    print()
    print(
        format_table(
            ["STEP", "SOURCE", "SECONDS"],
            [("start worker pool", "", f"{pool_seconds:.3f}"), *rows],
        )
    )
    print()
    print(f"Generated (greedy, {MAX_TOKENS} tokens; random weights, so the words are noise):")
    for name, text in texts:
        print(f"  {name}: {PROMPT!r} -> {text!r}")

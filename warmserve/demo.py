"""`warmserve demo`: load a real model, answer a question, swap to another model and back,
timing each step through the HTTP API.

The real model is SmolLM2-135M-Instruct, fetched once (with pip's progress bar) into the user
cache. Offline, the demo says so and runs on two random-weight checkpoints instead, whose words
are noise. The server runs in this process (one torch import fewer than a subprocess) on a free
port; the demo talks to it over HTTP like any client would.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from warmserve.client import ServerError, describe_error
from warmserve.config import user_cache_dir
from warmserve.real_model import SMOLLM2_FILE, FetchFailed, fetch_smollm2
from warmserve.text_tables import format_table

REAL_MODEL_NAME = "smollm2"
QUESTION = "What is the capital of France?"
PROMPT = "The weather today is"
MAX_TOKENS = 24
# Enough for the demo's exchanges; SmolLM2's full 8k context would need a larger KV cache than
# a CPU worker's default budget.
MAX_MODEL_LEN = 1024
HEALTH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DemoModel:
    name: str
    path: Path
    real: bool  # a trained model, asked a question in a chat; otherwise random weights

    @property
    def prompt(self) -> str:
        return QUESTION if self.real else PROMPT


def progress(message: str) -> None:
    print(f"... {message}", flush=True)


def run_demo_in_process(checkpoint_dir: str) -> int:
    try:
        asyncio.run(_demo(Path(checkpoint_dir)))
    except ServerError as exc:
        print(f"warmserve demo: error: {exc}")
        return 1
    return 0


def demo_models(directory: Path) -> tuple[DemoModel, DemoModel]:
    """The model to swap out and back in (SmolLM2, or a random qwen3 offline), and the random
    llama it is swapped with (another family, so the swap changes the model's code too)."""
    from warmserve.testing.checkpoints import ensure_checkpoint

    models_dir = user_cache_dir() / "models"
    if not (models_dir / SMOLLM2_FILE).is_file():
        progress(f"fetching SmolLM2-135M-Instruct (98 MB, once) into {models_dir}/")
    try:
        first = DemoModel(REAL_MODEL_NAME, fetch_smollm2(models_dir, show_progress=True), True)
    except FetchFailed as exc:
        progress(f"offline: {exc}")
        progress("using random-weight checkpoints instead: their words are noise")
        first = DemoModel("demo-a", ensure_checkpoint(directory / "demo-a", "qwen3"), False)
    progress(f"preparing the random-weight checkpoint in {directory}/")
    second = DemoModel("demo-b", ensure_checkpoint(directory / "demo-b", "llama"), False)
    return first, second


async def _demo(directory: Path) -> None:
    from warmserve.api.gateway import serve_gateway
    from warmserve.api.server import bind_socket
    from warmserve.config import ServerConfig
    from warmserve.controller.controller import Controller

    models = demo_models(directory)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    # No model root: the demo's models live in two places (the user cache and `directory`), and
    # its server listens on the loopback only.
    config = replace(ServerConfig(device="auto"), port=port)
    progress("starting the pre-warmed worker pool (device auto)")
    started = time.perf_counter()
    async with Controller(config) as controller:
        pool_seconds = time.perf_counter() - started
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve_gateway(controller, config, sock, stop, access_log=False)
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
                await _wait_until_healthy(http)
                rows, texts = await _swap_models(http, *models)
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


async def _swap_models(
    http: httpx.AsyncClient, first: DemoModel, second: DemoModel
) -> tuple[list[tuple[str, str, str]], list[tuple[DemoModel, str]]]:
    rows, texts = [], []

    async def load(model: DemoModel) -> dict:
        body = {"name": model.name, "path": str(model.path), "max_model_len": MAX_MODEL_LEN}
        return await _request(http, "POST", "/admin/models", json=body)

    async def generate(model: DemoModel) -> None:
        seconds, text = await _first_token_and_text(http, model)
        rows.append((f"first token {model.name}", "", f"{seconds:.3f}"))
        texts.append((model, text))

    progress(f"loading {first.name} from disk")
    loaded = await load(first)
    rows.append((f"load {first.name}", loaded["source"], f"{loaded['load_seconds']:.3f}"))
    await generate(first)

    progress(f"swapping {first.name} -> {second.name}")
    swap_started = time.perf_counter()
    unloaded = await _request(http, "DELETE", f"/admin/models/{first.name}")
    loaded = await load(second)
    swap_seconds = time.perf_counter() - swap_started
    rows.append(
        (
            f"swap {first.name} -> {second.name}",
            loaded["source"],
            f"{swap_seconds:.3f}  (unload {unloaded['unload_seconds']:.3f} s, "
            f"load {loaded['load_seconds']:.3f} s)",
        )
    )
    await generate(second)

    progress(f"loading {first.name} again")
    await _request(http, "DELETE", f"/admin/models/{second.name}")
    loaded = await load(first)
    rows.append((f"reload {first.name}", loaded["source"], f"{loaded['load_seconds']:.3f}"))
    await generate(first)
    return rows, texts


async def _request(http: httpx.AsyncClient, method: str, path: str, **kwargs) -> dict:
    response = await http.request(method, path, **kwargs)
    if not response.is_success:
        raise ServerError(describe_error(response))
    return response.json()


async def _first_token_and_text(http: httpx.AsyncClient, model: DemoModel) -> tuple[float, str]:
    """Streams a greedy answer (a chat for a real model, a completion otherwise); returns the
    seconds to the first event and the whole text."""
    body = {"model": model.name, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if model.real:
        route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": QUESTION}]
    else:
        route, body["prompt"] = "/v1/completions", PROMPT
    started = time.perf_counter()
    first_token_seconds = None
    pieces = []
    async with http.stream("POST", route, json=body) as response:
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
            for choice in event["choices"]:
                pieces.append(choice["delta"].get("content", "") if model.real else choice["text"])
    return first_token_seconds or 0.0, "".join(pieces)


def _print_report(
    pool_seconds: float, rows: list[tuple[str, str, str]], texts: list[tuple[DemoModel, str]]
) -> None:
    print()
    print(
        format_table(
            ["STEP", "SOURCE", "SECONDS"],
            [("start worker pool", "", f"{pool_seconds:.3f}"), *rows],
        )
    )
    print()
    print(f"Generated (greedy, at most {MAX_TOKENS} tokens):")
    for model, text in texts:
        note = "" if model.real else "  (random weights: noise)"
        print(f"  {model.name}: {model.prompt!r} -> {text.strip()!r}{note}")

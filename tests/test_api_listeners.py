"""The gateway on a real uvicorn socket over an in-memory controller: per-model ports open and
close with their model, and a client that hangs up mid-stream aborts its generation."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from fake_controller import FakeController

from warmserve.api.gateway import serve_gateway
from warmserve.api.server import bind_socket
from warmserve.config import ServerConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def running_gateway(controller):
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve_gateway(controller, ServerConfig(device="cpu"), sock, stop, access_log=False)
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.01)
            yield client
    finally:
        stop.set()
        await server
        sock.close()


def free_port() -> int:
    with contextlib.closing(bind_socket("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


async def test_model_port_serves_only_its_model_and_closes_on_unload():
    controller = FakeController()
    port = free_port()
    async with running_gateway(controller) as gateway:
        loaded = await gateway.post("/admin/models", json={"name": "a", "path": "a", "port": port})
        assert loaded.json()["port"] == port
        taken = await gateway.post("/admin/models", json={"name": "b", "path": "b", "port": port})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "port_in_use"

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as own:
            answer = await own.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert answer.json()["model"] == "a"
            assert (await own.get("/admin/models")).status_code == 404
        cards = (await gateway.get("/v1/models")).json()["data"]
        assert cards[0]["port"] == port

        assert (await gateway.delete("/admin/models/a")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/health")

        # The port is free again for the next model.
        again = await gateway.post("/admin/models", json={"name": "b", "path": "b", "port": port})
        assert again.status_code == 200


async def test_port_closes_when_the_controller_drops_the_model():
    controller = FakeController()
    port = free_port()
    async with running_gateway(controller) as gateway:
        await gateway.post("/admin/models", json={"name": "a", "path": "a", "port": port})
        await controller.unload("a")  # as an idle-timeout or a dead worker would
        for _ in range(200):
            try:
                async with httpx.AsyncClient() as client:
                    await client.get(f"http://127.0.0.1:{port}/health")
            # Refused, or accepted just before the listener closed and then reset.
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                return
            await asyncio.sleep(0.01)
        pytest.fail("the model's port stayed open after the model went away")


async def test_client_hang_up_mid_stream_aborts_the_generation():
    controller = FakeController()
    controller.token_delay_s = 0.02
    async with running_gateway(controller) as gateway:
        await gateway.post("/admin/models", json={"name": "a", "path": "a"})
        body = {"model": "a", "prompt": "x", "max_tokens": 10_000, "stream": True}
        async with gateway.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
        for _ in range(200):
            if controller.aborted:
                break
            await asyncio.sleep(0.01)
        assert controller.aborted == ["a"]
        assert controller.model("a").requests_in_flight == 0

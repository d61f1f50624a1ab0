"""Runs the gateway app (every model, admin, metrics) for a started controller."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from warmserve.api.app import create_app
from warmserve.api.server import ListenerServer
from warmserve.config import ServerConfig

# Streams still running at shut-down get this long to finish before they are cut.
GRACEFUL_SHUTDOWN_S = 10.0


async def serve_gateway(
    controller,
    config: ServerConfig,
    sock: socket.socket,
    stop: asyncio.Event,
    access_log: bool = True,
) -> None:
    """Serves the gateway app for a started controller on a bound socket until `stop` is set."""
    uvicorn_config = uvicorn.Config(
        create_app(controller, config),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=access_log,
        # Without access logs (the demo) the caller owns logging, so uvicorn must not set it up.
        log_config=uvicorn.config.LOGGING_CONFIG if access_log else None,
    )
    server = ListenerServer(uvicorn_config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    server.should_exit = True
    await serving

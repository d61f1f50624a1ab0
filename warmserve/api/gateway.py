"""Runs the gateway app (every model, admin, metrics) for a started controller."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from warmserve.api.app import create_app
from warmserve.api.server import ListenerServer, wait_until_serving
from warmserve.config import ServerConfig

logger = logging.getLogger("warmserve")

# Streams still running at shut-down get this long to finish before they are cut.
GRACEFUL_SHUTDOWN_S = 10.0


async def serve_gateway(
    controller,
    config: ServerConfig,
    sock: socket.socket,
    stop: asyncio.Event,
    access_log: bool = True,
    log_level: str | None = None,
) -> None:
    """Serves the gateway app for a started controller on a bound socket until `stop` is set;
    `log_level` (e.g. "WARNING") applies to uvicorn's own loggers too."""
    uvicorn_config = uvicorn.Config(
        create_app(controller, config),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=config.http_keep_alive_s,
        access_log=access_log,
        log_level=log_level.lower() if log_level else None,
        # Without access logs (the demo) the caller owns logging, so uvicorn must not set it up.
        log_config=uvicorn.config.LOGGING_CONFIG if access_log else None,
    )
    server = ListenerServer(uvicorn_config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until_serving(server, serving)
    host, port = sock.getsockname()[:2]
    logger.info("warmserve listening on http://%s:%d", host, port)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    server.should_exit = True
    await serving

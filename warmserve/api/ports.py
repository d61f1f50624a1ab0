"""Per-model listeners: a model loaded with `port` also answers on that port, for that model only.

The port is bound before the load starts, so a taken port fails the request before any worker
is touched, and served once the load finishes. A listener closes when its model goes away for
any reason (an unload request, eviction, a worker's death): the controller's events drive it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from warmserve.api.errors import APIError
from warmserve.api.server import ListenerServer, bind_socket, wait_until_serving

logger = logging.getLogger("warmserve.api")

GRACEFUL_CLOSE_S = 5.0  # streams still running on a closing listener get this long to end


class PortReservation:
    def __init__(self, port: int, sock: socket.socket, release: Callable[[int], None]):
        self.port = port
        self.sock = sock
        self._release = release

    def release(self) -> None:
        self.sock.close()
        self._release(self.port)


class _Listener:
    def __init__(self, port: int, server: uvicorn.Server):
        self.port = port
        self.server = server
        self.task: asyncio.Task | None = None

    async def open(self, sock: socket.socket) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        await wait_until_serving(self.server, self.task)

    async def close(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            # Shielded so that every caller waits for the same shut-down and none cuts it short.
            await asyncio.shield(self.task)


class ModelListeners:
    def __init__(self, host: str, app_for_model: Callable[[str], FastAPI]):
        self.host = host
        self.app_for_model = app_for_model
        self._listeners: dict[str, _Listener] = {}
        self._taken_ports: set[int] = set()
        self._closing_tasks: set[asyncio.Task] = set()

    def port_of(self, name: str) -> int | None:
        listener = self._listeners.get(name)
        return listener.port if listener else None

    def reserve(self, port: int) -> PortReservation:
        # Two sockets may both bind a port with SO_REUSEADDR until one listens: track our own.
        if port in self._taken_ports:
            raise APIError(409, f"port {port} is already used by another model", "port_in_use")
        try:
            sock = bind_socket(self.host, port)
        except OSError as exc:
            raise APIError(
                409, f"cannot listen on port {port}: {exc.strerror}", "port_in_use"
            ) from exc
        self._taken_ports.add(port)
        return PortReservation(port, sock, self._taken_ports.discard)

    async def open(self, name: str, reservation: PortReservation) -> None:
        """Serves `name` on the reserved port; returns once the port accepts connections."""
        config = uvicorn.Config(
            self.app_for_model(name),
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
        )
        listener = _Listener(reservation.port, ListenerServer(config))
        # Registered before it starts, so that the model going away meanwhile closes it.
        self._listeners[name] = listener
        try:
            await listener.open(reservation.sock)
        except BaseException:
            self._forget(name, listener)
            raise
        finally:
            if listener.task is None:
                reservation.release()
            else:
                listener.task.add_done_callback(lambda _: reservation.release())
        logger.info("model %s also listens on http://%s:%d", name, self.host, reservation.port)

    async def close(self, name: str) -> None:
        listener = self._listeners.get(name)
        if listener is None:
            return
        await listener.close()
        if self._forget(name, listener):
            logger.info("closed port %d of model %s", listener.port, name)

    def _forget(self, name: str, listener: _Listener) -> bool:
        # A new listener for the same name may have replaced this one meanwhile.
        if self._listeners.get(name) is listener:
            del self._listeners[name]
            return True
        return False

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(name) for name in list(self._listeners)))

    def on_model_event(self, event: str, name: str) -> None:
        """Controller listener: the model's port closes however the model went away."""
        if event in ("unloaded", "failed") and name in self._listeners:
            task = asyncio.create_task(self.close(name))
            self._closing_tasks.add(task)
            task.add_done_callback(self._closing_tasks.discard)

"""The uvicorn servers warmserve runs: the gateway and the per-model listeners."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn


class ListenerServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone.

    Stock uvicorn installs SIGINT/SIGTERM handlers while it serves and raises the signal again
    when it stops. The CLI handles signals itself for the server's whole life (the controller's
    start-up and shut-down included), and per-model listeners come and go while the gateway
    runs, so none of them may take the handlers over.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds without listening: the port is taken (a second bind fails at once) but connections
    are refused until uvicorn starts serving on it. Raises OSError if the port is in use."""
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def wait_until_serving(server: uvicorn.Server, task: asyncio.Task) -> None:
    """Returns once `server` (running in `task`) accepts connections, or once it has stopped
    again; raises whatever made its start-up fail."""
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        task.result()

"""What the worker pool asks of a launcher: which workers to start and where, the sockets they
reach the server by, starting one, and word of every one that exits (and of nodes that join)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import zmq

from warmserve.protocol import WorkerArgs

# Imported in the worker process only: the server never imports torch.
WORKER_ENTRY = "warmserve.worker.worker:worker_main"


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs."""

    device: str  # as the worker names it: "cpu" or "cuda:N"
    node: str  # the host: "local", or a Ray node id
    num_threads: int | None = None  # a CPU worker's share of its node's cores


class LaunchedWorker(Protocol):
    pid: int | None

    def alive(self) -> bool: ...

    def exit_status(self) -> str:
        """Why it is gone, for the log: "exit code 1", "its node died"."""
        ...

    def kill(self) -> None: ...

    def join(self, timeout_s: float) -> None: ...


class Launcher(Protocol):
    # For the log: where the sockets live (and which cluster).
    description: str

    async def start(self, on_node_joined: Callable[[list[WorkerSlot]], None]) -> list[WorkerSlot]:
        """The workers to start; `on_node_joined` is called (on the event loop) with the
        workers of every node that joins later."""
        ...

    def bind(self, sock: zmq.Socket, name: str) -> str:
        """Binds a server socket (secured where it is reachable from the network) and returns
        the address a worker connects to."""
        ...

    def peer_address(self, slot: WorkerSlot, name: str) -> str:
        """Where the worker in `slot` binds its peer inbox, which the other workers' send
        tensor-parallel steps to: reachable from them, and secured like `bind`'s sockets (the
        port may be left to ZeroMQ, `tcp://host:*`: the worker reports where it bound)."""
        ...

    def launch(
        self, args: WorkerArgs, slot: WorkerSlot, on_exit: Callable[[], None]
    ) -> LaunchedWorker:
        """Starts a worker; `on_exit` is called, from any thread, once it has exited."""
        ...

    async def rendezvous_address(self, lead: LaunchedWorker) -> str:
        """Where a tensor-parallel group meets: a free port on its lead worker's host."""
        ...

    def replaceable(self, worker: LaunchedWorker) -> bool:
        """Whether a worker that exited may be started again where it ran (not when its host
        is gone)."""
        ...

    def close(self) -> None: ...

"""The pool of warm workers: starts one per GPU (or N on CPU) through its launcher, holds a handle
to each, and tells the controller about every event a worker sends and every worker that dies.

Workers are started by the launcher alone (`launchers/`), which hands each one its socket
addresses; nothing else here assumes the workers run on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from warmserve.controller.launchers.base import LaunchedWorker, Launcher, WorkerSlot
from warmserve.protocol import (
    Shutdown,
    WorkerArgs,
    WorkerFailed,
    WorkerReady,
    command_encoder,
    event_decoder,
)


class StartupError(RuntimeError):
    pass


@dataclass
class WorkerHandle:
    id: int
    slot: WorkerSlot
    device: str
    process: LaunchedWorker | None = None
    socket: zmq.Socket | None = None
    # Where it takes the steps of the tensor-parallel models it follows: as bound, once ready.
    peer_address: str = ""
    pid: int | None = None
    state: str = "starting"  # starting | ready | dead
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    memory_idle_bytes: int = 0  # what the worker holds with no model (its baseline)
    # The worker's KV pool as it last reported: free bytes, and each deployment's cache
    # (mapped bytes, bytes in use).
    kv_pool_free_bytes: int = 0
    kv_by_deployment: dict[str, tuple[int, int]] = field(default_factory=dict)
    ready: asyncio.Future = field(default=None, repr=False)

    @property
    def node(self) -> str:
        return self.slot.node


class WorkerPool:
    """`on_death(worker_id, warmed_up)` is called on the event loop for every worker that exits
    while the pool is open; `warmed_up` says whether it had finished its warm-up.
    `on_joined(worker_ids)`: workers of a node that joined the cluster are starting."""

    def __init__(
        self,
        launcher: Launcher,
        worker_args: Callable[[int, WorkerSlot, str, str, str], WorkerArgs],
        on_event: Callable[[object], None],
        on_death: Callable[[int, bool], None],
    ):
        self.launcher = launcher
        self.worker_args = worker_args
        self.on_event = on_event
        self.on_death = on_death
        self.context = zmq.asyncio.Context()
        self.handles: list[WorkerHandle] = []
        self.generations: list[int] = []
        self.events: zmq.asyncio.Socket | None = None
        self.event_address = ""
        self.reader: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.closed = False

    async def start(self, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        slots = await self.launcher.start(self._nodes_joined)
        self.events = self.context.socket(zmq.PULL)
        self.event_address = self.launcher.bind(self.events, "events")
        self.reader = asyncio.create_task(self._read_events())
        for slot in slots:
            self._add(slot)
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(handle.ready for handle in self.handles), return_exceptions=True),
                timeout_s,
            )
        except TimeoutError:
            raise StartupError(
                f"workers did not finish their warm-up within {timeout_s:.0f} s"
            ) from None
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _add(self, slot: WorkerSlot) -> WorkerHandle:
        self.handles.append(WorkerHandle(id=len(self.handles), slot=slot, device=slot.device))
        self.generations.append(0)
        return self.spawn(len(self.handles) - 1)

    def _nodes_joined(self, slots: list[WorkerSlot]) -> None:
        if self.closing:
            return
        for slot in slots:
            self._add(slot)

    def spawn(self, worker_id: int) -> WorkerHandle:
        """Starts (or replaces) worker `worker_id`: a fresh process with fresh sockets."""
        old = self.handles[worker_id]
        if old.socket is not None:
            old.socket.close(linger=0)
        self.generations[worker_id] += 1
        handle = WorkerHandle(
            id=worker_id, slot=old.slot, device=old.slot.device, ready=self.loop.create_future()
        )
        handle.socket = self.context.socket(zmq.PUSH)
        handle.socket.setsockopt(zmq.LINGER, 0)
        name = f"{worker_id}-{self.generations[worker_id]}"
        address = self.launcher.bind(handle.socket, f"worker-{name}")
        peer_address = self.launcher.peer_address(handle.slot, f"peer-{name}")
        args = self.worker_args(worker_id, handle.slot, address, self.event_address, peer_address)
        self.handles[worker_id] = handle
        handle.process = self.launcher.launch(args, handle.slot, lambda: self._exited(handle))
        handle.pid = handle.process.pid
        return handle

    def replaceable(self, worker_id: int) -> bool:
        """Whether a dead worker's host is still there to start a replacement on."""
        return self.launcher.replaceable(self.handles[worker_id].process)

    async def rendezvous_address(self, lead: WorkerHandle) -> str:
        return await self.launcher.rendezvous_address(lead.process)

    def send(self, worker_id: int, command) -> None:
        self.send_to(self.handles[worker_id], command)

    def is_current(self, handle: WorkerHandle) -> bool:
        """Whether `handle` is still its worker's live process (not a dead one, not replaced)."""
        return self.handles[handle.id] is handle and handle.state != "dead"

    def send_to(self, handle: WorkerHandle, command) -> None:
        """Sends to that very process: nothing goes to a replacement of a dead worker."""
        if self.is_current(handle) and not self.closed:
            handle.socket.send(command_encoder.encode(command), copy=False)

    def broadcast(self, command, node: str | None = None) -> None:
        """Sends a command that needs no reply to every live worker (of `node`, if given)."""
        if self.closing:
            return
        for handle in self.handles:
            if node is None or handle.node == node:
                self.send_to(handle, command)

    async def _read_events(self) -> None:
        while True:
            frames = await self.events.recv()
            event = event_decoder.decode(frames)
            if isinstance(event, WorkerReady):
                handle = self.handles[event.worker_id]
                handle.pid = event.pid
                handle.device = event.device
                handle.memory_total_bytes = event.memory_total_bytes
                handle.memory_used_bytes = event.memory_used_bytes
                handle.memory_idle_bytes = event.memory_used_bytes
                handle.peer_address = event.peer_address
                handle.state = "ready"
                if not handle.ready.done():
                    handle.ready.set_result(event)
            elif isinstance(event, WorkerFailed):
                handle = self.handles[event.worker_id]
                if not handle.ready.done():
                    handle.ready.set_exception(
                        StartupError(
                            f"worker {event.worker_id} on {handle.device} failed its warm-up: "
                            f"{event.error}; its traceback is in the log above"
                        )
                    )
            self.on_event(event)

    def _exited(self, handle: WorkerHandle) -> None:
        """From the launcher's thread: that worker's process is gone."""
        if not self.closing:
            self.loop.call_soon_threadsafe(self._died, handle)

    def _died(self, handle: WorkerHandle) -> None:
        if self.closing or handle.state == "dead" or self.handles[handle.id] is not handle:
            return
        handle.state = "dead"
        warmed_up = handle.ready.done() and handle.ready.exception() is None
        if not handle.ready.done():
            handle.ready.set_exception(
                StartupError(
                    f"worker {handle.id} on {handle.device} exited during its warm-up "
                    f"({handle.process.exit_status()})"
                )
            )
        self.on_death(handle.id, warmed_up)

    async def close(self, timeout_s: float = 10.0) -> None:
        if self.closing:
            return
        self.closing = True
        live = [h for h in self.handles if h.process is not None and h.process.alive()]
        for handle in live:
            with contextlib.suppress(zmq.ZMQError):
                handle.socket.send(command_encoder.encode(Shutdown()))
        deadline = asyncio.get_running_loop().time() + timeout_s
        for handle in live:
            while handle.process.alive() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if handle.process.alive():
                handle.process.kill()
            await asyncio.to_thread(handle.process.join, 5)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        self.closed = True
        for handle in self.handles:
            if handle.socket is not None:
                handle.socket.close(linger=0)
        if self.events is not None:
            self.events.close(linger=0)
        self.launcher.close()
        self.context.term()

"""The pool of warm workers: spawns one process per GPU (or N on CPU), holds a handle to each,
and tells the controller about every event a worker sends and every worker that dies.

Workers are started by the launcher alone, which hands each one its socket addresses; nothing
else here assumes the workers run on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from warmserve.protocol import (
    Shutdown,
    WorkerArgs,
    WorkerFailed,
    WorkerReady,
    command_encoder,
    event_decoder,
)

# Imported in the worker process only: the server never imports torch.
WORKER_ENTRY = "warmserve.worker.worker:worker_main"


class StartupError(RuntimeError):
    pass


@dataclass
class WorkerHandle:
    id: int
    device: str
    process: multiprocessing.Process | None = None
    socket: zmq.Socket | None = None
    peer_address: str = ""  # see WorkerArgs.peer_address
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


class LocalLauncher:
    """Starts workers as child processes of this server, talking over ipc:// sockets."""

    def __init__(self, instance: str):
        # Named after the server instance, like its shared memory, so that what one server
        # leaves behind can be told from another's.
        self.socket_dir = tempfile.mkdtemp(prefix=f"warmserve-{instance}-")
        self.context = multiprocessing.get_context("spawn")

    def event_address(self) -> str:
        return f"ipc://{self.socket_dir}/events"

    def command_address(self, worker_id: int, generation: int) -> str:
        return f"ipc://{self.socket_dir}/worker-{worker_id}-{generation}"

    def peer_address(self, worker_id: int, generation: int) -> str:
        """Where the worker takes the steps of the tensor-parallel models it follows."""
        return f"ipc://{self.socket_dir}/peer-{worker_id}-{generation}"

    def launch(self, args: WorkerArgs) -> multiprocessing.Process:
        process = self.context.Process(
            target=run_entry,
            args=(WORKER_ENTRY, args),
            name=f"warmserve-worker-{args.worker_id}",
            daemon=True,
        )
        process.start()
        return process

    def rendezvous_address(self, lead_worker_id: int) -> str:
        """Where a tensor-parallel group meets: the lead worker's host (this one), a free port."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{probe.getsockname()[1]}"

    def close(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class WorkerPool:
    """`on_death(worker_id, warmed_up)` is called on the event loop for every worker that exits
    while the pool is open; `warmed_up` says whether it had finished its warm-up."""

    def __init__(
        self,
        devices: list[str],
        worker_args: Callable[[int, str, str, str, str], WorkerArgs],
        on_event: Callable[[object], None],
        on_death: Callable[[int, bool], None],
        instance: str,
    ):
        self.devices = devices
        self.worker_args = worker_args
        self.on_event = on_event
        self.on_death = on_death
        self.launcher = LocalLauncher(instance)
        self.context = zmq.asyncio.Context()
        self.handles = [WorkerHandle(id=i, device=device) for i, device in enumerate(devices)]
        self.generations = [0] * len(devices)
        self.events: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.closed = False
        self._monitor_wakeup = multiprocessing.Pipe(duplex=False)
        self._monitor: threading.Thread | None = None

    async def start(self, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.events = self.context.socket(zmq.PULL)
        self.events.bind(self.launcher.event_address())
        self.reader = asyncio.create_task(self._read_events())
        for handle in self.handles:
            self.spawn(handle.id)
        self._monitor = threading.Thread(target=self._watch_processes, daemon=True)
        self._monitor.start()
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

    def spawn(self, worker_id: int) -> WorkerHandle:
        """Starts (or replaces) worker `worker_id`: a fresh process with fresh sockets."""
        old = self.handles[worker_id]
        if old.socket is not None:
            old.socket.close(linger=0)
        self.generations[worker_id] += 1
        address = self.launcher.command_address(worker_id, self.generations[worker_id])
        handle = WorkerHandle(id=worker_id, device=old.device, ready=self.loop.create_future())
        handle.socket = self.context.socket(zmq.PUSH)
        handle.socket.setsockopt(zmq.LINGER, 0)
        handle.socket.bind(address)
        handle.peer_address = self.launcher.peer_address(worker_id, self.generations[worker_id])
        args = self.worker_args(
            worker_id, handle.device, address, self.launcher.event_address(), handle.peer_address
        )
        handle.process = self.launcher.launch(args)
        handle.pid = handle.process.pid
        self.handles[worker_id] = handle
        self._wake_monitor()
        return handle

    def send(self, worker_id: int, command) -> None:
        self.send_to(self.handles[worker_id], command)

    def is_current(self, handle: WorkerHandle) -> bool:
        """Whether `handle` is still its worker's live process (not a dead one, not replaced)."""
        return self.handles[handle.id] is handle and handle.state != "dead"

    def send_to(self, handle: WorkerHandle, command) -> None:
        """Sends to that very process: nothing goes to a replacement of a dead worker."""
        if self.is_current(handle) and not self.closed:
            handle.socket.send(command_encoder.encode(command), copy=False)

    def broadcast(self, command) -> None:
        """Sends a command that needs no reply to every live worker."""
        if self.closing:
            return
        for handle in self.handles:
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

    def _watch_processes(self) -> None:
        """Monitor thread: wakes the moment a worker process exits."""
        reader, _ = self._monitor_wakeup
        # A dead process's sentinel stays ready until the loop marks its worker dead: report it
        # once. Keyed by the process object (kept alive here), since fd numbers are reused.
        reported: dict[int, multiprocessing.Process] = {}
        while not self.closing:
            watched = {
                h.process.sentinel: h
                for h in self.handles
                if h.process is not None and h.state != "dead" and id(h.process) not in reported
            }
            ready = multiprocessing.connection.wait([reader, *watched], timeout=1.0)
            for item in ready:
                if item is reader:
                    reader.recv()
                elif not self.closing:
                    process = watched[item].process
                    # The sentinel fires as the process closes its files, a moment before it
                    # can be reaped; until then is_alive() is still true.
                    process.join(timeout=1.0)
                    if process.exitcode is not None:
                        reported[id(process)] = process
                        self.loop.call_soon_threadsafe(self._died, watched[item].id)

    def _wake_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor_wakeup[1].send(None)

    def _died(self, worker_id: int) -> None:
        handle = self.handles[worker_id]
        if self.closing or handle.state == "dead" or handle.process.is_alive():
            return
        handle.state = "dead"
        warmed_up = handle.ready.done() and handle.ready.exception() is None
        if not handle.ready.done():
            handle.ready.set_exception(
                StartupError(
                    f"worker {worker_id} on {handle.device} exited during its warm-up "
                    f"(exit code {handle.process.exitcode})"
                )
            )
        self.on_death(worker_id, warmed_up)

    async def close(self, timeout_s: float = 10.0) -> None:
        if self.closing:
            return
        self.closing = True
        self._wake_monitor()
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        for handle in self.handles:
            if handle.process is not None and handle.process.is_alive():
                with contextlib.suppress(zmq.ZMQError):
                    handle.socket.send(command_encoder.encode(Shutdown()))
        deadline = asyncio.get_running_loop().time() + timeout_s
        for handle in self.handles:
            if handle.process is None:
                continue
            while handle.process.is_alive() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if handle.process.is_alive():
                handle.process.kill()
            handle.process.join(timeout=5)
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
        self.context.term()
        self.launcher.close()
        for end in self._monitor_wakeup:
            end.close()


def run_entry(entry: str, args: WorkerArgs) -> None:
    """The worker process's target: imports the worker (and torch) in the child only."""
    import importlib

    module, function = entry.split(":")
    getattr(importlib.import_module(module), function)(args)


def default_num_threads(num_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))

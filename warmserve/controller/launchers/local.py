"""Workers as child processes of the server, talking over ipc:// sockets in a folder of its own."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable

import zmq

from warmserve.controller.launchers.base import WORKER_ENTRY, WorkerSlot
from warmserve.protocol import WorkerArgs

LOCAL_NODE = "local"


class LocalWorker:
    def __init__(self, process: multiprocessing.Process):
        self.process = process
        self.pid = process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def exit_status(self) -> str:
        return f"exit code {self.process.exitcode}"

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout_s: float) -> None:
        self.process.join(timeout=timeout_s)


class LocalLauncher:
    def __init__(self, instance: str, slots: list[WorkerSlot]):
        # Named after the server instance, like its shared memory, so that what one server
        # leaves behind can be told from another's.
        self.socket_dir = tempfile.mkdtemp(prefix=f"warmserve-{instance}-")
        self.description = f"worker sockets in {self.socket_dir}"
        self.slots = slots
        self.context = multiprocessing.get_context("spawn")
        self._watched: dict[int, tuple[multiprocessing.Process, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._wakeup = multiprocessing.Pipe(duplex=False)
        self._closing = False
        self._monitor: threading.Thread | None = None

    async def start(self, on_node_joined) -> list[WorkerSlot]:
        self._monitor = threading.Thread(target=self._watch_processes, daemon=True)
        self._monitor.start()
        return self.slots

    def bind(self, sock: zmq.Socket, name: str) -> str:
        address = f"ipc://{self.socket_dir}/{name}"
        sock.bind(address)
        return address

    def peer_address(self, slot: WorkerSlot, name: str) -> str:
        return f"ipc://{self.socket_dir}/{name}"

    def launch(
        self, args: WorkerArgs, slot: WorkerSlot, on_exit: Callable[[], None]
    ) -> LocalWorker:
        process = self.context.Process(
            target=run_entry,
            args=(WORKER_ENTRY, args),
            name=f"warmserve-worker-{args.worker_id}",
            daemon=True,
        )
        process.start()
        with self._lock:
            self._watched[process.sentinel] = (process, on_exit)
        self._wakeup[1].send(None)
        return LocalWorker(process)

    async def rendezvous_address(self, lead: LocalWorker) -> str:
        """The lead worker's host is this one: a free port here."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{probe.getsockname()[1]}"

    def replaceable(self, worker: LocalWorker) -> bool:
        return True

    def _watch_processes(self) -> None:
        """Monitor thread: wakes the moment a worker process exits."""
        reader, _ = self._wakeup
        while not self._closing:
            with self._lock:
                watched = dict(self._watched)
            ready = multiprocessing.connection.wait([reader, *watched], timeout=1.0)
            for item in ready:
                if item is reader:
                    reader.recv()
                    continue
                process, on_exit = watched[item]
                # The sentinel fires as the process closes its files, a moment before it can be
                # reaped; until then is_alive() is still true.
                process.join(timeout=1.0)
                if process.exitcode is not None and not self._closing:
                    with self._lock:
                        self._watched.pop(item, None)
                    on_exit()

    def close(self) -> None:
        self._closing = True
        self._wakeup[1].send(None)
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        for end in self._wakeup:
            end.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def run_entry(entry: str, args: WorkerArgs) -> None:
    """The worker process's target: imports the worker (and torch) in the child only."""
    import importlib

    module, function = entry.split(":")
    getattr(importlib.import_module(module), function)(args)

"""The Ray actors of a cluster pool; they run on the cluster's nodes, not in the server.

`WorkerActor` holds one GPU (or a share of a node's cores) and starts the worker as a child
process of its own, with the same main loop as a local worker. A child, not a thread of the
actor: the worker then owns its process as a local one does (one CUDA context per process, its
own signal handling, torch's thread pool sized for it), and the actor stays free to answer the
launcher (its pid, a free port for a tensor-parallel rendezvous) while the worker runs. The
worker exits when the actor is gone (it watches its parent), so a node that dies or an actor
that is killed leaves no worker behind.

`StoreAgent` is a node's host weight store: shared memory is node-local, so each node reads a
checkpoint into its own segments when the controller asks, and its workers copy from there.
Its segments are named after the agent's own instance (pid first), so two agents on one
machine never share a name, and the next agent on a node removes what a dead one left.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import ray

from warmserve.controller.shared_memory import new_instance_name, remove_stale_instances
from warmserve.loader.checkpoint import Checkpoint
from warmserve.loader.weight_store import HostWeightStore
from warmserve.protocol import TensorEntry, WeightSegment, WorkerArgs

WORKER_MODULE = "warmserve.controller.launchers.worker_process"


class WorkerActor:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def run(self, args: WorkerArgs) -> int:
        """Runs the worker process to its end; returns its exit code."""
        args = msgspec.structs.replace(args, parent_pid=os.getpid())
        self.process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE
        )
        self.process.stdin.write(msgspec.msgpack.encode(args))
        self.process.stdin.close()
        return self.process.wait()

    def free_port(self) -> str:
        """A free port on this node, for a tensor-parallel group's rendezvous."""
        address = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((address, 0))
            return f"tcp://{address}:{probe.getsockname()[1]}"


class StoreAgent:
    def __init__(self, capacity_bytes: int) -> None:
        remove_stale_instances()
        self.dropped: list[str] = []
        self.store = HostWeightStore(capacity_bytes, new_instance_name(), self.dropped.append)
        self.readers = ThreadPoolExecutor(2, thread_name_prefix="warmserve-store-fill")
        self.fills: dict[str, Future] = {}

    def lease(self, key: str, path: str) -> tuple[WeightSegment | None, str, list[str]]:
        """The node's segment for `key`, acquired: a stored copy ("host-cache"), or a new one
        that is being read from disk ("disk"; None when it cannot fit). Also the shm names the
        store dropped since the last lease, whose mappings the node's workers may let go."""
        segment = self.store.acquire(key)
        source = "host-cache"
        if segment is None:
            source = "disk"
            started = self.store.begin_checkpoint(key, Checkpoint(path))
            if started is not None:
                segment, fill = started
                self.fills[key] = self.readers.submit(fill)
        return segment, source, self._take_dropped()

    def acquire(self, key: str) -> tuple[WeightSegment | None, list[str]]:
        """The node's segment for `key` if it holds one, acquired; and the shm names dropped."""
        return self.store.acquire(key), self._take_dropped()

    def begin_shards(
        self, key: str, layout: list[list[TensorEntry]]
    ) -> tuple[WeightSegment | None, list[str]]:
        """A new segment (acquired) for tensor-parallel ranks on this node to write their
        spans into; and the shm names dropped to make room."""
        return self.store.begin_shards(key, layout), self._take_dropped()

    def finish_shards(self, key: str, written: bool) -> None:
        self.store.finish_shards(key, written)
        self.store.release(key)

    def _take_dropped(self) -> list[str]:
        dropped, self.dropped = self.dropped, []
        return dropped

    def filled(self, key: str) -> None:
        """Returns once the segment of the last lease of `key` is read (raises if that failed)."""
        fill = self.fills.pop(key, None)
        if fill is not None:
            fill.result()

    def release(self, key: str) -> None:
        self.store.release(key)

    def used_bytes(self) -> int:
        return self.store.used_bytes

    def close(self) -> None:
        self.store.close()

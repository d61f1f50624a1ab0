"""Workers as Ray actors on the nodes of a Ray cluster (`warmserve serve --ray-address`).

One actor per GPU on every node (on CPU, `--workers N` spread over the nodes), each pinned to
its node and starting the worker as its child process (`ray_actors.py` says why). Workers reach
the server, and each other (the steps of tensor-parallel models), over tcp:// sockets secured
with CURVE (`curve.py`). A watcher thread waits on every actor's run: an actor that ends (its
worker exited, or its node died) is reported like a local process that exits; the same thread
looks at the cluster every few seconds and starts the workers of nodes that join.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import msgspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from warmserve.controller.launchers.base import WorkerSlot
from warmserve.controller.launchers.cluster_plan import (
    cluster_device,
    joined_workers,
    plan_workers,
)
from warmserve.controller.launchers.curve import CurveServer
from warmserve.controller.launchers.ray_actors import WorkerActor
from warmserve.controller.launchers.ray_cluster import RayCluster
from warmserve.protocol import WorkerArgs

log = logging.getLogger("warmserve.controller")
NODE_POLL_S = 2.0
WAIT_POLL_S = 0.5
# The actor runs the worker's main loop and answers the launcher (a rendezvous port) meanwhile.
ACTOR_THREADS = 4


class RayWorker:
    """A worker started in a Ray actor."""

    def __init__(self, actor, node: str):
        self.actor = actor
        self.node = node
        self.pid: int | None = None  # known once the worker reports ready
        self.status: str | None = None  # why it ended, once it has
        # The actor itself ended, not just the worker process: its node died (or someone killed
        # it); the node may not be seen as dead yet.
        self.actor_died = False
        self.ended = threading.Event()

    def alive(self) -> bool:
        return not self.ended.is_set()

    def exit_status(self) -> str:
        return self.status or "running"

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def join(self, timeout_s: float) -> None:
        self.ended.wait(timeout_s)


class RayLauncher:
    def __init__(self, cluster: RayCluster, device: str, workers: int | None):
        self.cluster = cluster
        self.device = device
        self.workers = workers
        self.description = f"workers on the Ray cluster at {cluster.address}"
        self.curve: CurveServer | None = None
        self.actor_class = None
        self._running: dict[ray.ObjectRef, tuple[RayWorker, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._known_nodes: set[str] = set()
        self._node_ips: dict[str, str] = {}  # the address other nodes reach each node by
        self._on_node_joined: Callable[[list[WorkerSlot]], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    async def start(self, on_node_joined) -> list[WorkerSlot]:
        self._loop = asyncio.get_running_loop()
        self._on_node_joined = on_node_joined
        self.cluster.connect()  # on this (main) thread: see RayCluster.connect
        self.actor_class = ray.remote(WorkerActor)
        nodes = self.cluster.nodes()
        self._known_nodes = {node.id for node in nodes}
        self._node_ips = {node.id: node.address for node in nodes}
        self.device = cluster_device(nodes, self.device)
        slots = plan_workers(nodes, self.device, self.workers)
        log.info("Ray cluster: %d node(s), %d %s worker(s)", len(nodes), len(slots), self.device)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return slots

    def bind(self, sock, name: str) -> str:
        if self.curve is None:
            self.curve = CurveServer(sock.context, self.cluster.ip)
        return self.curve.bind(sock)

    def peer_address(self, slot: WorkerSlot, name: str) -> str:
        """A port ZeroMQ picks on the worker's node, where the other workers reach it; the
        worker's inbox is a CURVE server (warmserve/curve.py)."""
        return f"tcp://{self._node_ips[slot.node]}:*"

    def launch(self, args: WorkerArgs, slot: WorkerSlot, on_exit: Callable[[], None]) -> RayWorker:
        # Pinned to its node. It reserves its GPU, but no Ray CPU: the plan spreads CPU workers
        # over the nodes itself and sizes their threads to the node's cores.
        actor = self.actor_class.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node, soft=False),
            num_cpus=0,
            num_gpus=1 if slot.device.startswith("cuda") else 0,
            max_concurrency=ACTOR_THREADS,
        ).remote()
        worker = RayWorker(actor, slot.node)
        run = actor.run.remote(msgspec.structs.replace(args, curve=self.curve.keys))
        with self._lock:
            self._running[run] = (worker, on_exit)
        return worker

    async def rendezvous_address(self, lead: RayWorker) -> str:
        return await lead.actor.free_port.remote()

    def replaceable(self, worker: RayWorker) -> bool:
        """A worker process that exited is started again in a new actor on its node; one whose
        actor died is not (its node is most likely gone; a node that comes back joins anew)."""
        if worker.actor_died:
            return False
        self.cluster.nodes()
        return self.cluster.alive(worker.node)

    def _watch(self) -> None:
        next_look = time.monotonic() + NODE_POLL_S
        while not self._closing.is_set():
            with self._lock:
                running = dict(self._running)
            if running:
                ended, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_POLL_S)
            else:
                ended = []
                self._closing.wait(WAIT_POLL_S)
            for ref in ended:
                worker, on_exit = running[ref]
                with self._lock:
                    self._running.pop(ref, None)
                try:
                    worker.status = f"exit code {ray.get(ref)}"
                except ray.exceptions.RayError as exc:
                    worker.status = f"its Ray actor ended ({type(exc).__name__})"
                    worker.actor_died = True
                ray.kill(worker.actor, no_restart=True)  # gives its GPU back to the cluster
                worker.ended.set()
                on_exit()
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + NODE_POLL_S
                self._look_for_new_nodes()

    def _look_for_new_nodes(self) -> None:
        try:
            nodes = self.cluster.nodes()
        except Exception:
            log.exception("could not list the Ray cluster's nodes")
            return
        for node in nodes:
            if node.id in self._known_nodes:
                continue
            self._known_nodes.add(node.id)
            self._node_ips[node.id] = node.address
            slots = joined_workers(node, self.device)
            log.info("node %s (%s) joined: %d worker(s)", node.id, node.address, len(slots))
            if slots and not self._closing.is_set():
                self._loop.call_soon_threadsafe(self._on_node_joined, slots)

    def close(self) -> None:
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            workers = [worker for worker, _ in self._running.values()]
        for worker in workers:
            ray.kill(worker.actor, no_restart=True)
        if self.curve is not None:
            self.curve.close()

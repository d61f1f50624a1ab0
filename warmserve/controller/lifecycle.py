"""Loading, unloading, evicting and failing deployments.

A load is placed by memory: the workers with room take it; when none has room, the least
recently used idle models that may make room are evicted until one has; when only busy models
(or models still within their minimum residency) hold the memory, the load waits for them, up to
its deadline. One placement decision runs at a time, so two loads never count the same free
bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from warmserve.config import GIB, ModelSpec, ServerConfig
from warmserve.controller.catalogue import CheckpointCatalogue, footprint_per_worker
from warmserve.controller.channel import CommandChannel, load_error
from warmserve.controller.deployment import Deployment, Deployments, DeploymentState
from warmserve.controller.engine_client import EngineClient
from warmserve.controller.errors import (
    CheckpointInvalid,
    ControllerError,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NoCapacity,
    QueueTimeout,
)
from warmserve.controller.host_stores import Lease, LocalStores
from warmserve.controller.memory import MemoryLedger
from warmserve.controller.placement import (
    WorkerRoom,
    check_fits_at_all,
    choose_evictions,
    choose_workers,
    no_room_message,
    room_may_come,
)
from warmserve.controller.policies import evictable_now, may_go
from warmserve.controller.pool import WorkerPool
from warmserve.controller.shards import lease_segments, store_shards
from warmserve.controller.types import LoadResult
from warmserve.loader.checkpoint import Checkpoint
from warmserve.protocol import CommandDone, LoadModel, RegisterSegment, UnloadModel

log = logging.getLogger("warmserve.controller")
# How often a load waiting for room looks again even if nothing signalled (a model's minimum
# residency running out signals nothing).
ROOM_POLL_S = 0.1


class Lifecycle:
    def __init__(
        self,
        config: ServerConfig,
        pool: WorkerPool,
        channel: CommandChannel,
        ledger: MemoryLedger,
        catalogue: CheckpointCatalogue,
        stores: LocalStores,
        deployments: Deployments,
        notify: Callable[[str, str], None],
        counters: dict[str, int],
    ):
        self.config = config
        self.pool = pool
        self.channel = channel
        self.ledger = ledger
        self.catalogue = catalogue
        self.stores = stores  # LocalStores, or the cluster's RayStores
        self.deployments = deployments
        self.notify = notify
        self.counters = counters
        self.evictions_by_model: dict[str, int] = {}
        # Where the lead worker's time went in the last unload (benchmarks read it).
        self.last_unload_phases: dict[str, float] = {}
        self._placing = asyncio.Lock()
        self._room = asyncio.Event()
        self._last_used: dict[str, float] = {}  # of models no longer loaded

    # ---- room -----------------------------------------------------------------------------

    def room_changed(self) -> None:
        """Wakes the loads waiting for room: memory was freed, or a model became idle."""
        self._room.set()
        self._room = asyncio.Event()

    async def _wait_for_room(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), min(remaining, ROOM_POLL_S))
        return True

    def _rooms(self) -> list[WorkerRoom]:
        """Every worker of the pool, ready or not: placement's blocks are fixed by them all."""
        rooms = []
        for handle in self.pool.handles:
            residents = tuple(
                d
                for d in self.deployments.on_worker(handle.id)
                if d.state != DeploymentState.FAILED
            )
            rooms.append(
                WorkerRoom(
                    handle.id,
                    self.ledger.usable(handle.id),
                    self.ledger.free(handle.id),
                    residents,
                    handle.node,
                    ready=handle.state == "ready",
                )
            )
        return rooms

    async def _place(self, deployment: Deployment, need: int, deadline: float) -> list[int]:
        """Workers with `need` bytes free for the deployment, held in the ledger; evicts and
        waits as the module docstring says. While it waits for busy models that could make
        room, those take no new requests (they yield), so they drain and go."""
        tp = deployment.tensor_parallel_size
        yielding: list[Deployment] = []
        try:
            while True:
                async with self._placing:
                    rooms = self._rooms()
                    if any(room.ready for room in rooms):
                        check_fits_at_all(rooms, len(self.pool.handles), tp, need)
                    holding = self.stores.nodes_holding(deployment.path)
                    chosen = choose_workers(rooms, tp, need, holding)
                    if chosen is not None:
                        for worker_id in chosen:
                            self.ledger.hold(worker_id, deployment.id, need)
                        return chosen
                    candidates = evictable_now(self.deployments, self.config.min_residency_s)
                    victims = choose_evictions(rooms, tp, need, candidates)
                    for victim in victims:
                        await self._evict(victim, deployment.name)
                    if victims:
                        continue
                    for busy in self._to_drain(rooms, tp, need):
                        if not busy.yielding:
                            busy.yielding = True
                            yielding.append(busy)
                starting = any(handle.state == "starting" for handle in self.pool.handles)
                if not starting and not room_may_come(rooms, tp, need):
                    raise NoCapacity(no_room_message(deployment.name, need, rooms))
                if not await self._wait_for_room(deadline):
                    raise QueueTimeout(
                        f"model {deployment.name!r} waited {self.config.queue_timeout_s:.0f} s "
                        f"for room ({need / GIB:.2f} GiB per worker) held by models still "
                        "serving requests; retry later"
                    )
        finally:
            for busy in yielding:
                busy.yielding = False

    def _to_drain(self, rooms: list[WorkerRoom], tp: int, need: int) -> list[Deployment]:
        """The busy models whose eviction, once idle, would make room."""
        candidates = may_go(self.deployments, self.config.min_residency_s)
        return choose_evictions(rooms, tp, need, candidates)

    async def _evict(self, victim: Deployment, for_model: str) -> None:
        if not victim.idle or self.deployments.get(victim.name) is not victim:
            return  # a request arrived, or someone else unloads it: look again
        log.info("evicting %s to make room for %s", victim.name, for_model)
        try:
            await self.unload(victim.name)
        except (ModelNotFound, ModelExists):
            return
        self.counters["evictions"] += 1
        self.evictions_by_model[victim.name] = self.evictions_by_model.get(victim.name, 0) + 1

    # ---- load -----------------------------------------------------------------------------

    async def load(self, spec: ModelSpec, evictable: bool) -> LoadResult:
        started = time.perf_counter()
        deadline = time.monotonic() + self.config.queue_timeout_s
        name = spec.name
        self._refuse_if_present(name)
        resolved = self.catalogue.resolve(spec.path)
        checkpoint, tokenizer = await self.catalogue.open(resolved)
        max_model_len = spec.max_model_len or self.config.max_model_len
        need = footprint_per_worker(
            checkpoint, self.config.engine, spec.dtype, spec.tensor_parallel_size, max_model_len
        )
        self._refuse_if_present(name)
        deployment = Deployment(
            id=f"{name}-{uuid.uuid4().hex[:8]}",
            name=name,
            path=str(resolved),
            tensor_parallel_size=spec.tensor_parallel_size,
            dtype=spec.dtype,
            requested_max_model_len=max_model_len,
            tokenizer=tokenizer,
            keep_alive=spec.keep_alive,
            pinned=spec.pinned,
            evictable=evictable,
            memory_bytes=need,
        )
        self.deployments.add(deployment)
        self.notify("loading", name)
        try:
            worker_ids = await self._place(deployment, need, deadline)
            deployment.handles = [self.pool.handles[worker_id] for worker_id in worker_ids]
            source, replies = await self._load_on_workers(deployment, checkpoint)
            if deployment.state == DeploymentState.FAILED:  # a rank lost it meanwhile
                raise ModelUnavailable(f"model {name!r} failed while loading: {deployment.error}")
        except BaseException as exc:
            await self._release_workers(deployment, failed=True)
            self._remove(deployment)
            deployment.state, deployment.error = DeploymentState.FAILED, str(exc)
            deployment.settled.set()
            raise
        lead = deployment.lead
        deployment.client = EngineClient(
            tokenizer,
            min(reply.max_model_len for reply in replies),
            int(checkpoint.config["vocab_size"]),
            deployment.id,
            lambda command: self.pool.send_to(lead, command),
        )
        for handle, reply in zip(deployment.handles, replies, strict=True):
            self.ledger.settle(handle.id, deployment.id, reply.model_bytes)
        deployment.memory_bytes = max(reply.model_bytes for reply in replies)
        deployment.load_source = source
        deployment.load_seconds = time.perf_counter() - started
        deployment.last_used = time.time()
        deployment.loaded_at = time.monotonic()
        deployment.state = DeploymentState.LOADED
        deployment.settled.set()
        self.notify("loaded", name)
        log.info(
            "loaded %s on worker(s) %s from %s in %.2f s (%.2f GiB per worker)",
            name,
            deployment.workers,
            source,
            deployment.load_seconds,
            deployment.memory_bytes / GIB,
        )
        phases = {"worker_s": replies[0].seconds, **replies[0].phases}
        return LoadResult(name, deployment.workers, deployment.load_seconds, source, phases)

    def _refuse_if_present(self, name: str) -> None:
        existing = self.deployments.get(name)
        if existing is not None and existing.state != DeploymentState.FAILED:
            raise ModelExists(f"model {name!r} is already {existing.state.value}")

    async def _load_on_workers(self, deployment: Deployment, checkpoint: Checkpoint):
        """Each worker copies from its own node's host store (a tensor-parallel group spans
        nodes only when no node has enough workers): the node's shards of its ranks, or the
        checkpoint's tensors (`shards.py`)."""
        leases: dict[str, Lease] = {}
        try:
            leases = await lease_segments(self.stores, deployment, checkpoint)
            lead_source = leases[deployment.lead.node].source
            tp = deployment.tensor_parallel_size
            init_method = await self.pool.rendezvous_address(deployment.lead) if tp > 1 else None
            peers = [handle.peer_address for handle in deployment.handles] if tp > 1 else []

            def build(rank: int, command_id: int) -> LoadModel:
                handle = deployment.handles[rank]
                return LoadModel(
                    command_id=command_id,
                    deployment=deployment.id,
                    name=deployment.name,
                    model_dir=deployment.path,
                    segment=leases[handle.node].segment,
                    dtype=deployment.dtype,
                    max_model_len=deployment.requested_max_model_len,
                    engine=self.config.engine,
                    tp_rank=rank,
                    tp_size=tp,
                    dist_init_method=init_method,
                    memory_budget_bytes=self.ledger.held(handle.id, deployment.id),
                    peer_addresses=peers,
                )

            replies = await self.channel.command(deployment.handles, build)
            for node, lease in leases.items():
                if lease.filled is not None:
                    await lease.filled
                    # The node's workers register the new segment for DMA in the background.
                    self.pool.broadcast(RegisterSegment(lease.segment), node=node)
        except OSError as exc:
            raise CheckpointInvalid(f"{deployment.path}: {exc}") from None
        finally:
            for lease in leases.values():
                lease.release()
        failures = [reply for reply in replies if not isinstance(reply, CommandDone) or reply.error]
        if failures:
            raise load_error(failures[0])
        if any(reply.shard for reply in replies):
            shards = [reply.shard for reply in replies]
            await store_shards(self.stores, self.channel, self.pool, deployment, shards)
        return lead_source, replies

    # ---- unload and failure ---------------------------------------------------------------

    async def unload(self, name: str) -> float:
        started = time.perf_counter()
        deployment = self.deployments.get(name)
        if deployment is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if deployment.state == DeploymentState.LOADING:
            await deployment.settled.wait()
            return await self.unload(name)
        if deployment.state == DeploymentState.UNLOADING:
            raise ModelExists(f"model {name!r} is already being unloaded")
        if deployment.state == DeploymentState.FAILED:
            self._remove(deployment)
            return time.perf_counter() - started
        deployment.state = DeploymentState.UNLOADING
        self.notify("unloading", name)
        await self._drain(deployment)
        deployment.client.fail_all(f"model {name!r} was unloaded")
        await self._release_workers(deployment)
        self._remove(deployment)
        self.notify("unloaded", name)
        log.info("unloaded %s in %.3f s", name, time.perf_counter() - started)
        return time.perf_counter() - started

    async def _drain(self, deployment: Deployment) -> None:
        """Lets requests in flight finish, for at most the grace period."""
        deadline = time.monotonic() + self.config.unload_grace_s
        while deployment.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _release_workers(self, deployment: Deployment, failed: bool = False) -> None:
        """Has each of the deployment's workers drop it, once, and frees its ledger holdings.
        `failed`: a load that failed, whose ranks may not all have joined its group."""
        if deployment.workers_released:
            return
        deployment.workers_released = True
        owned = self.owned_handles(deployment)
        if owned:
            with contextlib.suppress(ControllerError):
                replies = await self.channel.command(
                    owned,
                    lambda rank, command_id: UnloadModel(command_id, deployment.id, failed),
                )
                lead = replies[0]
                if isinstance(lead, CommandDone):
                    self.last_unload_phases = {"worker_s": lead.seconds, **lead.phases}
        for handle in deployment.handles:
            self.ledger.release(handle.id, deployment.id)
        self.room_changed()

    def fail(self, deployment: Deployment, reason: str) -> None:
        if deployment.state == DeploymentState.FAILED:
            return
        deployment.state = DeploymentState.FAILED
        deployment.error = reason
        log.error("model %s failed: %s", deployment.name, reason)
        if deployment.client is not None:
            deployment.client.fail_all(f"model {deployment.name!r} failed: {reason}")
        # The surviving ranks drop their shard, each on its own (commands to one worker run in
        # order); also during an unload, whose ranks would wait for a lead that may be gone.
        for handle in self.owned_handles(deployment):
            self.pool.send_to(handle, UnloadModel(self.channel.next_id(), deployment.id, True))
        if not deployment.workers_released:
            deployment.workers_released = True
            for handle in deployment.handles:
                self.ledger.release(handle.id, deployment.id)
        deployment.settled.set()
        self.room_changed()
        self.notify("failed", deployment.name)

    def owned_handles(self, deployment: Deployment):
        """The deployment's workers that are still the same live processes."""
        return [handle for handle in deployment.handles if self.pool.is_current(handle)]

    def _remove(self, deployment: Deployment) -> None:
        if self.deployments.remove(deployment) and deployment.last_used is not None:
            self._last_used[deployment.name] = deployment.last_used
        deployment.removed.set()
        self.room_changed()

    def last_used(self, name: str) -> float | None:
        return self._last_used.get(name)

    def forget(self, name: str) -> None:
        self._last_used.pop(name, None)

"""The controller: deployments of models onto the warm worker pool, and the host weight store.

It runs on the server's asyncio loop. A load places a model on idle workers, makes sure its
weights are in the host store (reading the disk only the first time) and tells the workers to
build it; an unload frees the workers for the next model. The processes never restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from warmserve.config import DTYPES, ModelSpec, SamplingParams, ServerConfig
from warmserve.controller import engine_client
from warmserve.controller.errors import (
    CheckpointInvalid,
    ControllerError,
    InvalidRequest,
    LoadFailed,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NoCapacity,
    Overloaded,
    PathForbidden,
)
from warmserve.controller.placement import choose_workers
from warmserve.controller.policies import KEEP_ALIVE_CHECK_S, eviction_candidate, expired
from warmserve.controller.pool import StartupError, WorkerHandle, WorkerPool, default_num_threads
from warmserve.controller.registry import load_registry
from warmserve.controller.tokenizer import ModelTokenizer
from warmserve.controller.types import GenerationChunk, LoadResult, ModelInfo, WorkerInfo
from warmserve.engine.engine import TORCH_DTYPES
from warmserve.loader.checkpoint import Checkpoint, CheckpointError, read_model_config
from warmserve.loader.weight_store import HostWeightStore
from warmserve.models.config import ModelConfig
from warmserve.models.registry import UnsupportedArchitecture, model_class
from warmserve.protocol import (
    CommandDone,
    ForgetSegment,
    LoadModel,
    MemoryReleased,
    ModelLost,
    RegisterSegment,
    RequestFailed,
    SegmentRegistered,
    StepOutputs,
    UnloadModel,
    WorkerReady,
)
from warmserve.worker.worker import WorkerArgs

log = logging.getLogger("warmserve.controller")
GIB = 2**30


@dataclass
class Deployment:
    name: str
    path: str
    tensor_parallel_size: int
    dtype: str
    requested_max_model_len: int | None
    state: str = "loading"  # loading | loaded | unloading | failed
    # The worker processes it was placed on. A dead worker's replacement is a new handle at the
    # same id, which this deployment never owns.
    handles: list[WorkerHandle] = field(default_factory=list)
    workers_released: bool = False  # its workers went back to the pool (happens once)
    load_command_ids: dict[int, int] = field(default_factory=dict)  # worker id -> its LoadModel
    tokenizer: ModelTokenizer | None = None
    client: engine_client.EngineClient | None = None
    load_source: str | None = None
    load_seconds: float | None = None
    last_used: float | None = None
    memory_bytes: int = 0
    error: str | None = None
    keep_alive: float = -1.0  # seconds idle before an automatic unload; -1 = never
    pinned: bool = False  # never evicted
    evictable: bool = False  # registered models make room for others; explicit loads stay
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when loading ends
    removed: asyncio.Event = field(default_factory=asyncio.Event)  # set when it leaves

    @property
    def workers(self) -> list[int]:
        return [handle.id for handle in self.handles]

    @property
    def lead(self) -> WorkerHandle:
        return self.handles[0]


class WorkerDied(Exception):
    pass


class Controller:
    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.instance = uuid.uuid4().hex[:8]
        self.store = HostWeightStore(
            int(self.config.host_cache_gb * GIB), self.instance, self._segment_dropped
        )
        self.pool: WorkerPool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deployments: dict[str, Deployment] = {}
        self._pending: dict[tuple[int, int], asyncio.Future] = {}
        self._next_command_id = 0
        self._listeners: list[Callable[[str, str], None]] = []
        self._replacements: set[asyncio.Task] = set()
        self.registry: dict[str, ModelSpec] = {}
        if self.config.models_file:
            for spec in load_registry(self.config.models_file):
                self.registry[spec.name] = spec
        self.counters = {"auto_loads": 0, "evictions": 0, "idle_unloads": 0}
        # shm name -> workers that registered that host-store segment for DMA
        self.registered_segments: dict[str, set[int]] = {}
        # Where the lead worker's time went in the last unload (benchmarks read it).
        self.last_unload_phases: dict[str, float] = {}
        self._auto_loads: dict[str, asyncio.Task] = {}
        self._checkpoints: dict[Path, tuple[tuple, tuple[Checkpoint, ModelTokenizer]]] = {}
        self._background: set[asyncio.Task] = set()
        self._admitted: dict[str, int] = {}  # model name -> generations running or waiting
        self._last_used: dict[str, float] = {}  # of models no longer loaded
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        devices = self._devices()
        threads = default_num_threads(len(devices)) if devices[0] == "cpu" else None

        def worker_args(worker_id, device, command_address, event_address):
            return WorkerArgs(
                worker_id=worker_id,
                device=device,
                command_address=command_address,
                event_address=event_address,
                memory_budget_bytes=int(self.config.cpu_worker_memory_gb * GIB),
                gpu_memory_utilization=self.config.gpu_memory_utilization,
                memory_release_delay_s=self.config.memory_release_delay_s,
                num_threads=threads,
                parent_pid=os.getpid(),
            )

        self.pool = WorkerPool(
            devices, worker_args, self._on_event, self._on_death, instance=self.instance
        )
        log.info(
            "instance %s: shared memory /dev/shm/warmserve-%s-*, worker sockets in %s",
            self.instance,
            self.instance,
            self.pool.launcher.socket_dir,
        )
        try:
            await self.pool.start(self.config.load_timeout_s)
        except BaseException:
            await self.close()
            raise
        self._spawn(self._keep_alive_loop())
        for spec in self.registry.values():
            if spec.preload:
                try:
                    await self._auto_load(spec.name)
                except ControllerError as exc:
                    log.error("preloading %s failed: %s", spec.name, exc)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        # A controller error reached whoever awaited the task (if anyone still did).
        exc = task.exception()
        if exc is not None and not isinstance(exc, ControllerError):
            log.error("background task failed", exc_info=exc)

    async def _shielded(self, coroutine):
        """Runs a load or unload to its end even if the caller stops waiting (an HTTP client
        that hangs up), so that no model is left half loaded or half unloaded."""
        return await asyncio.shield(self._spawn(coroutine))

    def _devices(self) -> list[str]:
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            count = torch.cuda.device_count()
            if count == 0:
                raise StartupError("--device cuda, but no GPU is visible; use --device cpu")
            wanted = self.config.workers or count
            if wanted > count:
                raise StartupError(f"--workers {wanted}, but only {count} GPU(s) are visible")
            return [f"cuda:{i}" for i in range(wanted)]
        if device != "cpu":
            raise StartupError(f"--device must be auto, cuda or cpu, not {device!r}")
        return ["cpu"] * (self.config.workers or 2)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for deployment in self.deployments.values():
            if deployment.client is not None:
                deployment.client.fail_all("the server is shutting down")
        for task in [*self._replacements, *self._background]:
            task.cancel()
        if self.pool is not None:
            await self.pool.close()
        self.store.close()
        for future in self._pending.values():
            if not future.done():
                future.cancel()

    def add_listener(self, callback: Callable[[str, str], None]) -> None:
        self._listeners.append(callback)

    def _notify(self, event: str, name: str) -> None:
        for callback in self._listeners:
            try:
                callback(event, name)
            except Exception:
                log.exception("listener failed on %s %s", event, name)

    # ---- worker events --------------------------------------------------------------------

    def _on_event(self, event) -> None:
        if isinstance(event, WorkerReady):
            # A replacement worker maps the host store's segments like the others did.
            for segment in self.store.segments():
                self.pool.send(event.worker_id, RegisterSegment(segment))
        elif isinstance(event, CommandDone):
            future = self._pending.pop((event.worker_id, event.command_id), None)
            if future is not None and not future.done():
                future.set_result(event)
            handle = self.pool.handles[event.worker_id]
            handle.memory_used_bytes = event.memory_used_bytes
        elif isinstance(event, StepOutputs):
            deployment = self._deployment_on(event.worker_id)
            if deployment is not None and deployment.client is not None:
                for output in event.outputs:
                    deployment.client.deliver(output)
        elif isinstance(event, RequestFailed):
            deployment = self._deployment_on(event.worker_id)
            if deployment is not None and deployment.client is not None:
                deployment.client.fail(event.request_id, event.error, event.invalid_request)
        elif isinstance(event, SegmentRegistered):
            self.registered_segments.setdefault(event.shm_name, set()).add(event.worker_id)
        elif isinstance(event, MemoryReleased):
            self.pool.handles[event.worker_id].memory_used_bytes = event.memory_used_bytes
        elif isinstance(event, ModelLost):
            deployment = self._deployment_on(event.worker_id)
            loaded_by = deployment.load_command_ids.get(event.worker_id) if deployment else None
            if loaded_by == event.load_command_id:
                self._fail_deployment(deployment, f"worker {event.worker_id}: {event.error}")

    def _deployment_on(self, worker_id: int) -> Deployment | None:
        name = self.pool.handles[worker_id].model
        return self.deployments.get(name) if name else None

    def _on_death(self, worker_id: int, warmed_up: bool) -> None:
        log.error("worker %d died", worker_id)
        for (owner, _), future in list(self._pending.items()):
            if owner == worker_id and not future.done():
                future.set_exception(WorkerDied(f"worker {worker_id} died"))
        for deployment in list(self.deployments.values()):
            if worker_id in deployment.workers and deployment.state in ("loaded", "unloading"):
                self._fail_deployment(deployment, f"worker {worker_id} died")
        if not warmed_up:
            # It would most likely fail again: no restart loop; the log says why it died.
            log.error("worker %d died before finishing its warm-up; not replacing it", worker_id)
            return
        task = asyncio.ensure_future(self._replace_worker(worker_id))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    def _fail_deployment(self, deployment: Deployment, reason: str) -> None:
        if deployment.state == "failed":
            return
        deployment.state = "failed"
        deployment.error = reason
        if deployment.client is not None:
            deployment.client.fail_all(f"model {deployment.name!r} failed: {reason}")
        if not deployment.workers_released:
            deployment.workers_released = True
            for handle in self._owned_handles(deployment):
                # The surviving ranks drop their shard. Commands to one worker run in order, so
                # the next model placed there is built only after this unload: no need to wait.
                self.pool.send_to(handle, UnloadModel(self._command_id()))
                handle.state, handle.model = "idle", None
        deployment.settled.set()
        self._notify("failed", deployment.name)

    def _owned_handles(self, deployment: Deployment) -> list[WorkerHandle]:
        """The deployment's workers that are still the same live processes."""
        return [
            handle
            for handle in deployment.handles
            if self.pool.handles[handle.id] is handle and handle.state != "dead"
        ]

    async def _replace_worker(self, worker_id: int) -> None:
        if self.pool.closing:
            return
        started = time.perf_counter()
        handle = self.pool.spawn(worker_id)
        try:
            await asyncio.wait_for(handle.ready, self.config.load_timeout_s)
            log.info(
                "worker %d replaced (pid %s) in %.1f s",
                worker_id,
                handle.pid,
                time.perf_counter() - started,
            )
        except Exception:
            log.exception("worker %d could not be replaced", worker_id)

    def _broadcast(self, command) -> None:
        """Sends a command that needs no reply to every live worker."""
        if self.pool is None or self.pool.closing:
            return
        for handle in self.pool.handles:
            if handle.state != "dead":
                self.pool.send(handle.id, command)

    def _segment_dropped(self, shm_name: str) -> None:
        # The store drops segments from its reader threads too: hop onto the loop that owns the
        # sockets.
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._forget_segment, shm_name)

    def _forget_segment(self, shm_name: str) -> None:
        self.registered_segments.pop(shm_name, None)
        self._broadcast(ForgetSegment(shm_name))

    def _command_id(self) -> int:
        self._next_command_id += 1
        return self._next_command_id

    async def _command(self, handles: list[WorkerHandle], build: Callable[[int, int], object]):
        """Sends one command to each worker (built per rank) and waits for every reply (or the
        WorkerDied of a worker that is gone)."""
        loop = asyncio.get_running_loop()
        keys, futures = [], []
        for rank, handle in enumerate(handles):
            command_id = self._command_id()
            future = loop.create_future()
            if self.pool.handles[handle.id] is not handle or handle.state == "dead":
                future.set_exception(WorkerDied(f"worker {handle.id} died"))
            else:
                self._pending[(handle.id, command_id)] = future
                keys.append((handle.id, command_id))
                self.pool.send_to(handle, build(rank, command_id))
            futures.append(future)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.config.load_timeout_s
            )
        except TimeoutError:
            workers = [handle.id for handle in handles]
            raise LoadFailed(
                f"workers {workers} did not answer within {self.config.load_timeout_s:.0f} s"
            ) from None
        finally:
            for key in keys:
                self._pending.pop(key, None)

    # ---- load and unload ------------------------------------------------------------------

    def resolve_path(self, path: str) -> Path:
        root = self.config.model_root
        try:
            candidate = Path(path).expanduser()
            if root is None:
                return candidate.resolve()
            root_path = Path(root).expanduser().resolve()
            resolved = (candidate if candidate.is_absolute() else root_path / candidate).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop, ...
            raise InvalidRequest(f"path {path!r} is not usable: {exc}") from None
        if not resolved.is_relative_to(root_path):
            raise PathForbidden(f"{path!r} lies outside the model root")
        return resolved

    async def load(
        self,
        name: str,
        path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        keep_alive: float = -1.0,
    ) -> LoadResult:
        """Loads a model under `name`. Models loaded this way stay until unloaded (or until
        `keep_alive` seconds without a request) and are never evicted for another model."""
        _validate_load(name, tensor_parallel_size, dtype, max_model_len)
        spec = ModelSpec(
            name=name,
            path=path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            keep_alive=keep_alive,
        )
        return await self._shielded(self._load(spec, evictable=False))

    async def _load(self, spec: ModelSpec, evictable: bool) -> LoadResult:
        started = time.perf_counter()
        name = spec.name
        self._refuse_if_present(name)
        resolved = self.resolve_path(spec.path)
        checkpoint, tokenizer = await self._checkpoint(resolved)
        needed = _bytes_per_worker(checkpoint, spec.dtype, spec.tensor_parallel_size)
        worker_ids = await self._place(spec.tensor_parallel_size, needed)
        self._refuse_if_present(name)
        deployment = Deployment(
            name=name,
            path=str(resolved),
            tensor_parallel_size=spec.tensor_parallel_size,
            dtype=spec.dtype,
            requested_max_model_len=spec.max_model_len,
            handles=[self.pool.handles[worker_id] for worker_id in worker_ids],
            tokenizer=tokenizer,
            keep_alive=spec.keep_alive,
            pinned=spec.pinned,
            evictable=evictable,
        )
        self.deployments[name] = deployment
        for handle in deployment.handles:
            handle.state, handle.model = "loading", name
        self._notify("loading", name)
        try:
            source, replies = await self._load_on_workers(deployment, checkpoint)
            if deployment.state == "failed":  # a rank reported the model lost meanwhile
                raise ModelUnavailable(f"model {name!r} failed while loading: {deployment.error}")
        except BaseException as exc:
            await self._release_workers(deployment)
            self._remove(deployment)
            deployment.state, deployment.error = "failed", str(exc)
            deployment.settled.set()
            raise
        max_len = min(reply.max_model_len for reply in replies)
        lead = deployment.lead
        deployment.client = engine_client.EngineClient(
            tokenizer,
            max_len,
            int(checkpoint.config["vocab_size"]),
            lambda command: self.pool.send_to(lead, command),
        )
        deployment.memory_bytes = sum(reply.memory_used_bytes for reply in replies)
        deployment.load_source = source
        deployment.load_seconds = time.perf_counter() - started
        deployment.last_used = time.time()
        deployment.state = "loaded"
        for handle in deployment.handles:
            handle.state = "loaded"
        deployment.settled.set()
        self._notify("loaded", name)
        phases = {"worker_s": replies[0].seconds, **replies[0].phases}
        return LoadResult(name, deployment.workers, deployment.load_seconds, source, phases)

    async def _checkpoint(self, path: Path) -> tuple[Checkpoint, ModelTokenizer]:
        """The checkpoint's index and tokenizer, read once per folder version: a reload (a swap)
        skips parsing headers and tokenizer.json (a real tokenizer takes ~100 ms)."""
        version = _folder_version(path)
        cached = self._checkpoints.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        opened = await asyncio.to_thread(_open_checkpoint, path)
        self._checkpoints[path] = (version, opened)
        return opened

    def _refuse_if_present(self, name: str) -> None:
        existing = self.deployments.get(name)
        if existing is not None and existing.state != "failed":
            raise ModelExists(f"model {name!r} is already {existing.state}")

    async def _place(self, tp: int, bytes_per_worker: int) -> list[int]:
        """Idle workers for a new model. Evicts least recently used idle models to make room,
        and waits for room that is on its way (an unload under way, a worker being replaced)."""
        deadline = time.monotonic() + self.config.load_timeout_s
        while True:
            try:
                return choose_workers(self.pool.handles, tp, bytes_per_worker)
            except NoCapacity:
                victim = eviction_candidate(self.deployments.values())
                if victim is not None:
                    await self._evict(victim)
                    continue
                coming = self._room_on_its_way()
                try:
                    if not coming or time.monotonic() >= deadline:
                        raise
                    await asyncio.wait(coming, timeout=deadline - time.monotonic())
                finally:
                    for waiter in coming:
                        waiter.cancel()

    async def _evict(self, victim: Deployment) -> None:
        log.info("evicting %s to make room", victim.name)
        try:
            await self.unload(victim.name)
        except (ModelNotFound, ModelExists):
            return  # someone else is unloading it: its workers come free all the same
        self.counters["evictions"] += 1

    def _room_on_its_way(self) -> list[asyncio.Task]:
        """Waiters for what may free a worker soon: unloads under way, replacement workers
        still warming up. The caller cancels them."""
        waits = [d.removed.wait() for d in self.deployments.values() if d.state == "unloading"]
        waits += [_settled(h.ready) for h in self.pool.handles if h.state == "starting"]
        return [asyncio.ensure_future(wait) for wait in waits]

    def _remove(self, deployment: Deployment) -> None:
        if self.deployments.get(deployment.name) is deployment:
            del self.deployments[deployment.name]
            if deployment.last_used is not None:
                self._last_used[deployment.name] = deployment.last_used
        deployment.removed.set()

    async def _load_on_workers(self, deployment: Deployment, checkpoint: Checkpoint):
        key = deployment.path
        segment = self.store.acquire(key)
        source = "host-cache"
        filling = None
        if segment is None:
            source = "disk"
            started = await asyncio.to_thread(self.store.begin_checkpoint, key, checkpoint)
            if started is not None:
                segment, fill = started
                # The workers start copying while the disk is still being read.
                filling = asyncio.ensure_future(asyncio.to_thread(fill))
                # Seen by the awaiting below, or by the workers (ready word) if a load fails first.
                filling.add_done_callback(lambda task: task.cancelled() or task.exception())
        tp = deployment.tensor_parallel_size
        init_method = self.pool.launcher.rendezvous_address(deployment.lead.id) if tp > 1 else None

        def build(rank: int, command_id: int) -> LoadModel:
            deployment.load_command_ids[deployment.handles[rank].id] = command_id
            return LoadModel(
                command_id=command_id,
                name=deployment.name,
                model_dir=deployment.path,
                segment=segment,
                dtype=deployment.dtype,
                max_model_len=deployment.requested_max_model_len,
                engine=self.config.engine,
                tp_rank=rank,
                tp_size=tp,
                dist_init_method=init_method,
            )

        try:
            replies = await self._command(deployment.handles, build)
            if filling is not None:
                await filling
                self._broadcast(RegisterSegment(segment))
        except OSError as exc:
            raise CheckpointInvalid(f"{deployment.path}: {exc}") from None
        finally:
            if segment is not None:
                self.store.release(key)
        failures = [reply for reply in replies if not isinstance(reply, CommandDone) or reply.error]
        if failures:
            raise _load_error(failures[0])
        return source, replies

    async def _release_workers(self, deployment: Deployment) -> None:
        """Returns a deployment's workers to idle (each drops whatever it built), once."""
        if deployment.workers_released:
            return
        deployment.workers_released = True
        owned = self._owned_handles(deployment)
        if owned:
            with contextlib.suppress(ControllerError):
                replies = await self._command(
                    owned, lambda rank, command_id: UnloadModel(command_id)
                )
                lead = replies[0]
                if isinstance(lead, CommandDone):
                    self.last_unload_phases = {"worker_s": lead.seconds, **lead.phases}
        for handle in self._owned_handles(deployment):
            handle.state, handle.model = "idle", None

    async def unload(self, name: str) -> float:
        return await self._shielded(self._unload(name))

    async def _unload(self, name: str) -> float:
        started = time.perf_counter()
        deployment = self.deployments.get(name)
        if deployment is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if deployment.state == "loading":
            await deployment.settled.wait()
            return await self._unload(name)
        if deployment.state == "unloading":
            raise ModelExists(f"model {name!r} is already being unloaded")
        if deployment.state == "failed":
            self._remove(deployment)
            return time.perf_counter() - started
        deployment.state = "unloading"
        for handle in deployment.handles:
            handle.state = "unloading"
        self._notify("unloading", name)
        await self._drain(deployment)
        deployment.client.fail_all(f"model {name!r} was unloaded")
        await self._release_workers(deployment)
        self._remove(deployment)
        self._notify("unloaded", name)
        return time.perf_counter() - started

    async def _drain(self, deployment: Deployment) -> None:
        """Lets requests in flight finish, for at most the grace period."""
        deadline = time.monotonic() + self.config.unload_grace_s
        while deployment.client.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ---- requests -------------------------------------------------------------------------

    async def _serving(self, name: str) -> Deployment:
        """The loaded deployment for `name`, loading a registered model on demand (again, after
        a failure)."""
        deadline = time.monotonic() + self.config.load_timeout_s
        while time.monotonic() < deadline:
            deployment = self.deployments.get(name)
            if deployment is None or (deployment.state == "failed" and name in self.registry):
                if name not in self.registry:
                    raise ModelNotFound(f"model {name!r} is neither loaded nor registered")
                await self._auto_load(name)
                continue
            if deployment.state == "loaded":
                return deployment
            if deployment.state == "loading":
                await _wait(deployment.settled, deadline)
            elif deployment.state == "unloading" and name in self.registry:
                await _wait(deployment.removed, deadline)
            elif deployment.state == "failed":
                raise ModelUnavailable(
                    f"model {name!r} failed ({deployment.error}); load it again to use it"
                )
            else:
                raise ModelUnavailable(f"model {name!r} is {deployment.state}")
        raise ModelUnavailable(f"model {name!r} did not become ready in time")

    async def _auto_load(self, name: str) -> None:
        """Loads a registered model; concurrent callers share one load."""
        task = self._auto_loads.get(name)
        if task is None:
            self.counters["auto_loads"] += 1
            task = self._spawn(self._load(self.registry[name], evictable=True))
            self._auto_loads[name] = task
            task.add_done_callback(lambda _: self._auto_loads.pop(name, None))
        # ModelExists: loaded by someone else in the meantime; the caller looks again.
        with contextlib.suppress(ModelExists):
            await asyncio.shield(task)

    async def generate(
        self,
        name: str,
        prompt: str | list[int],
        params: SamplingParams,
        keep_alive: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Streams a generation; `keep_alive` (seconds, -1 = never) overrides how long the
        model stays loaded once idle, as Ollama's request field does.

        Each model admits its engine's batch plus `max_queued_requests` waiting requests
        (waiting for a load included); beyond that a request is refused at once (Overloaded),
        so that a burst cannot pile up requests that would time out anyway."""
        admitted = self._admitted.get(name, 0)
        limit = self.config.engine.max_num_seqs + self.config.max_queued_requests
        if admitted >= limit:
            raise Overloaded(
                f"model {name!r} has {admitted} requests running or queued, the most it takes; "
                "retry later"
            )
        self._admitted[name] = admitted + 1
        try:
            deployment = await self._serving(name)
            if keep_alive is not None:
                deployment.keep_alive = keep_alive
            try:
                async for chunk in deployment.client.generate(prompt, params):
                    yield chunk
            except engine_client.RequestAborted as exc:
                raise ModelUnavailable(str(exc)) from None
            finally:
                deployment.last_used = time.time()
                if deployment.keep_alive == 0 and deployment.client.in_flight == 0:
                    self._spawn(self._unload_idle(deployment))
        finally:
            self._admitted[name] -= 1
            if not self._admitted[name]:
                del self._admitted[name]

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_CHECK_S)
            for deployment in expired(self.deployments.values(), time.time()):
                try:
                    await self._unload_idle(deployment)
                except Exception:
                    # One failed unload must not end keep-alive for every model.
                    log.exception("unloading idle model %s failed", deployment.name)

    async def _unload_idle(self, deployment: Deployment) -> None:
        if self.deployments.get(deployment.name) is not deployment:
            return
        if deployment.state != "loaded" or deployment.client.in_flight:
            return
        self.counters["idle_unloads"] += 1
        with contextlib.suppress(ModelNotFound, ModelExists):
            await self.unload(deployment.name)

    # ---- registry -------------------------------------------------------------------------

    async def register(self, spec: ModelSpec) -> None:
        """Adds a model that loads on its first request; its checkpoint is checked now. With
        `preload` it is loaded before this returns, and a failed load leaves it unregistered."""
        self._refuse_if_known(spec.name)
        _validate_load(spec.name, spec.tensor_parallel_size, spec.dtype, spec.max_model_len)
        await self._checkpoint(self.resolve_path(spec.path))
        self._refuse_if_known(spec.name)
        self.registry[spec.name] = spec
        if spec.preload:
            try:
                await self._auto_load(spec.name)
            except BaseException:
                if self.registry.get(spec.name) is spec:
                    del self.registry[spec.name]
                raise

    def _refuse_if_known(self, name: str) -> None:
        if name in self.registry or name in self.deployments:
            raise ModelExists(f"model {name!r} is already registered or loaded")

    async def unregister(self, name: str) -> None:
        """Forgets a registered model, unloading it first if it is loaded."""
        if self.registry.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} is not registered")
        self._last_used.pop(name, None)
        if name in self.deployments:
            with contextlib.suppress(ModelNotFound):
                await self.unload(name)

    def tokenizer(self, name: str) -> ModelTokenizer:
        deployment = self.deployments.get(name)
        if deployment is not None and deployment.tokenizer is not None:
            return deployment.tokenizer
        spec = self.registry.get(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} is neither loaded nor registered")
        try:
            return ModelTokenizer(self.resolve_path(spec.path))
        except CheckpointError as exc:
            raise CheckpointInvalid(str(exc)) from None

    # ---- views ----------------------------------------------------------------------------

    def model(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise ModelNotFound(f"model {name!r} is neither loaded nor registered")

    def models(self) -> list[ModelInfo]:
        infos = [_model_info(d) for d in self.deployments.values()]
        for spec in self.registry.values():
            if spec.name not in self.deployments:
                infos.append(self._registered_info(spec))
        return infos

    def _registered_info(self, spec: ModelSpec) -> ModelInfo:
        try:
            in_host_cache = str(self.resolve_path(spec.path)) in self.store
        except ControllerError:
            in_host_cache = False
        return ModelInfo(
            name=spec.name,
            path=spec.path,
            state="host-cache" if in_host_cache else "disk",
            tensor_parallel_size=spec.tensor_parallel_size,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            last_used=self._last_used.get(spec.name),
            keep_alive=spec.keep_alive,
            pinned=spec.pinned,
        )

    def workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(
                id=h.id,
                pid=h.pid,
                device=h.device,
                state=h.state,
                model=h.model,
                memory_total_bytes=h.memory_total_bytes,
                memory_used_bytes=h.memory_used_bytes,
                memory_idle_bytes=h.memory_idle_bytes,
            )
            for h in self.pool.handles
        ]

    @property
    def host_cache_bytes(self) -> int:
        return self.store.used_bytes

    @property
    def host_cache_capacity_bytes(self) -> int:
        return self.store.capacity_bytes


def _validate_load(name: str, tp: int, dtype: str, max_model_len: int | None) -> None:
    if not isinstance(name, str) or not name or len(name) > 128 or "/" in name:
        raise InvalidRequest("name must be 1 to 128 characters without '/'")
    if not isinstance(tp, int) or tp < 1:
        raise InvalidRequest("tensor_parallel_size must be a positive integer")
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be one of {sorted(DTYPES)}")
    if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
        raise InvalidRequest("max_model_len must be an integer of at least 2")


async def _settled(future: asyncio.Future) -> None:
    """Waits for a future that is not ours to end, however it ends; cancelling the wait leaves
    the future alone."""
    with contextlib.suppress(Exception):
        await asyncio.shield(future)


async def _wait(event: asyncio.Event, deadline: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))


def _open_checkpoint(path: Path) -> tuple[Checkpoint, ModelTokenizer]:
    try:
        _, config = read_model_config(path)
        model_class(config)
        ModelConfig.from_dict(config)
        return Checkpoint(path), ModelTokenizer(path)
    except CheckpointError as exc:
        raise CheckpointInvalid(str(exc)) from None
    except UnsupportedArchitecture as exc:
        raise CheckpointInvalid(f"{path / 'config.json'}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointInvalid(f"{path / 'config.json'}: invalid config ({exc})") from None
    except OSError as exc:  # a name too long, a directory that cannot be read, ...
        raise CheckpointInvalid(f"{path}: cannot read the checkpoint ({exc.strerror})") from None


def _folder_version(path: Path) -> tuple:
    """Changes when any file of the checkpoint folder changes (names, sizes, times)."""
    try:
        return tuple(
            sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir())
        )
    except OSError:
        return ()


def _bytes_per_worker(checkpoint: Checkpoint, dtype: str, tp: int) -> int:
    if dtype == "auto":
        return checkpoint.nbytes // tp
    source_itemsize = next(iter(checkpoint.tensors.values())).dtype.itemsize
    return checkpoint.nbytes * TORCH_DTYPES[dtype].itemsize // source_itemsize // tp


def _load_error(reply) -> ControllerError:
    if isinstance(reply, WorkerDied):
        return ModelUnavailable(f"{reply} while loading")
    if isinstance(reply, BaseException):
        return LoadFailed(str(reply))
    if reply.error_type == "CheckpointError":
        return CheckpointInvalid(reply.error)
    if reply.error_type == "InsufficientMemory":
        return NoCapacity(reply.error)
    if reply.error_type in ("ValueError", "ShapeMismatch", "UnsupportedArchitecture"):
        return InvalidRequest(reply.error)
    return LoadFailed(f"{reply.error_type}: {reply.error}")


def _model_info(deployment: Deployment) -> ModelInfo:
    client = deployment.client
    return ModelInfo(
        name=deployment.name,
        path=deployment.path,
        state=deployment.state,
        workers=list(deployment.workers),
        tensor_parallel_size=deployment.tensor_parallel_size,
        dtype=deployment.dtype,
        max_model_len=client.max_model_len if client else deployment.requested_max_model_len,
        load_source=deployment.load_source,
        load_seconds=deployment.load_seconds,
        last_used=deployment.last_used,
        requests_in_flight=client.in_flight if client else 0,
        memory_bytes=deployment.memory_bytes,
        keep_alive=deployment.keep_alive,
        pinned=deployment.pinned,
        error=deployment.error,
    )

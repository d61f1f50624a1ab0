"""The controller: a façade over the pool of warm workers, the deployments placed on them and the
host weight store.

It runs on the server's asyncio loop. Each job has its own module: `lifecycle` (load, unload,
evict, fail), `admission` (which requests a model takes, the queue for loads), `memory` (the
per-worker ledger), `placement`, `policies`, `catalogue` (checkpoints), `channel` (commands that
wait for replies), `events` (what workers report), `pool` (the processes). The server process
never imports torch: the workers do the device work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from warmserve.config import ConfigError, ModelSpec, ServerConfig
from warmserve.controller.admission import Admission
from warmserve.controller.catalogue import CheckpointCatalogue
from warmserve.controller.channel import CommandChannel
from warmserve.controller.deployment import Deployment, Deployments, DeploymentState
from warmserve.controller.devices import worker_args_factory
from warmserve.controller.engine_client import RequestAborted
from warmserve.controller.errors import (
    CheckpointInvalid,
    ControllerError,
    InvalidRequest,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
)
from warmserve.controller.events import ENGINE_STEP_BUCKETS, EventRouter
from warmserve.controller.histograms import Histograms
from warmserve.controller.launchers.choice import host_stores, make_launcher
from warmserve.controller.lifecycle import Lifecycle
from warmserve.controller.memory import MemoryLedger
from warmserve.controller.policies import KEEP_ALIVE_CHECK_S, expired
from warmserve.controller.pool import WorkerPool
from warmserve.controller.registry import load_registry
from warmserve.controller.shared_memory import new_instance_name, remove_stale_instances
from warmserve.controller.tokenizer import ModelTokenizer
from warmserve.controller.types import (
    GenerationChunk,
    LoadResult,
    ModelInfo,
    WorkerInfo,
)
from warmserve.controller.views import deployment_info, registered_info, worker_info
from warmserve.loader.checkpoint import CheckpointError
from warmserve.protocol import ForgetSegment

log = logging.getLogger("warmserve.controller")


class Controller:
    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        remove_stale_instances()
        self.instance = new_instance_name()
        # The Ray cluster the workers run on (--ray-address), else None.
        self.stores, self.cluster = host_stores(self.config, self.instance, self._segment_dropped)
        self.pool: WorkerPool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deployments = Deployments()
        self.registry: dict[str, ModelSpec] = {}
        if self.config.models_file:
            for spec in load_registry(self.config.models_file):
                self.registry[spec.name] = spec
        self.counters = {"auto_loads": 0, "evictions": 0, "idle_unloads": 0}
        self.catalogue = CheckpointCatalogue(self.config.model_root)
        self.ledger = MemoryLedger()
        self.admission = Admission(
            self.config, self.deployments, self.registry, self._start_auto_load, self.counters
        )
        self.lifecycle: Lifecycle | None = None
        self.events: EventRouter | None = None
        self._listeners: list[Callable[[str, str], None]] = []
        self._replacements: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        self._closed = False

    # ---- start and stop -------------------------------------------------------------------

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.launcher = make_launcher(self.config, self.instance, self.cluster)
        self.pool = WorkerPool(
            self.launcher, worker_args_factory(self.config), self._on_event, self._on_death
        )
        self.channel = CommandChannel(self.pool, self.config.load_timeout_s)
        self.lifecycle = Lifecycle(
            self.config,
            self.pool,
            self.channel,
            self.ledger,
            self.catalogue,
            self.stores,
            self.deployments,
            self._notify,
            self.counters,
        )
        self.step_stats = Histograms(ENGINE_STEP_BUCKETS)
        self.events = EventRouter(
            self.pool,
            self.channel,
            self.ledger,
            self.deployments,
            self.lifecycle,
            self.stores,
            self.step_stats,
        )
        log.info(
            "instance %s: shared memory /dev/shm/warmserve-%s-*, %s",
            self.instance,
            self.instance,
            self.launcher.description,
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
                    await self._start_auto_load(spec)
                except ControllerError as exc:
                    log.error("preloading %s failed: %s", spec.name, exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for deployment in self.deployments:
            if deployment.client is not None:
                deployment.client.fail_all("the server is shutting down")
        for task in [*self._replacements, *self._background]:
            task.cancel()
        if self.pool is not None:
            await self.pool.close()
            self.channel.cancel_all()
        self.stores.close()

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

    def add_listener(self, callback: Callable[[str, str], None]) -> None:
        self._listeners.append(callback)

    def _notify(self, event: str, name: str) -> None:
        for callback in self._listeners:
            try:
                callback(event, name)
            except Exception:
                log.exception("listener failed on %s %s", event, name)

    # ---- workers --------------------------------------------------------------------------

    def _on_event(self, event) -> None:
        self.events(event)

    def _on_death(self, worker_id: int, warmed_up: bool) -> None:
        log.error("worker %d died", worker_id)
        self.channel.worker_died(worker_id)
        self.ledger.worker_gone(worker_id)
        for deployment in self.deployments.on_worker(worker_id):
            if deployment.state in (DeploymentState.LOADED, DeploymentState.UNLOADING):
                self.lifecycle.fail(deployment, f"worker {worker_id} died")
        if not warmed_up:
            # It would most likely fail again: no restart loop; the log says why it died.
            log.error("worker %d died before finishing its warm-up; not replacing it", worker_id)
            return
        if not self.pool.replaceable(worker_id):
            log.error("worker %d: its node left the cluster; not replacing it", worker_id)
            return
        task = asyncio.ensure_future(self._replace_worker(worker_id))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

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

    def _segment_dropped(self, node: str, shm_name: str) -> None:
        # The store drops segments from its reader threads too: hop onto the loop that owns the
        # sockets.
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._forget_segment, node, shm_name)

    def _forget_segment(self, node: str, shm_name: str) -> None:
        if self.events is not None:
            self.events.registered_segments.pop(shm_name, None)
        if self.pool is not None:
            self.pool.broadcast(ForgetSegment(shm_name), node=node)

    @property
    def registered_segments(self) -> dict[str, set[int]]:
        return self.events.registered_segments

    @property
    def last_unload_phases(self) -> dict[str, float]:
        return self.lifecycle.last_unload_phases

    # ---- load and unload ------------------------------------------------------------------

    async def load(
        self,
        name: str,
        path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        keep_alive: float = -1.0,
    ) -> LoadResult:
        """Loads a model under `name`, on the worker(s) with room, evicting idle registered
        models if none has. Models loaded this way stay until unloaded (or until `keep_alive`
        seconds without a request) and are never evicted for another model."""
        try:
            spec = ModelSpec(
                name=name,
                path=path,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                max_model_len=max_model_len,
                keep_alive=keep_alive,
            )
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        return await self._shielded(self.lifecycle.load(spec, evictable=False))

    def _start_auto_load(self, spec: ModelSpec) -> asyncio.Task:
        return self._spawn(self.lifecycle.load(spec, evictable=True))

    async def unload(self, name: str) -> float:
        return await self._shielded(self.lifecycle.unload(name))

    # ---- requests -------------------------------------------------------------------------

    async def generate(
        self,
        name: str,
        prompt: str | list[int],
        params,
        keep_alive: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Streams a generation; `keep_alive` (seconds, -1 = never) overrides how long the
        model stays loaded once idle, as Ollama's request field does. A request for a
        registered model that is not loaded waits for its load (see `admission`)."""
        async with self.admission.admit(name) as deployment:
            if keep_alive is not None:
                deployment.keep_alive = keep_alive
            try:
                async for chunk in deployment.client.generate(prompt, params):
                    yield chunk
            except RequestAborted as exc:
                raise ModelUnavailable(str(exc)) from None
            finally:
                deployment.last_used = time.time()
                if deployment.in_flight == 0:
                    self.lifecycle.room_changed()  # it may be evicted now
                    if deployment.keep_alive == 0:
                        self._spawn(self._unload_idle(deployment))

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_CHECK_S)
            for deployment in expired(self.deployments, time.time()):
                try:
                    await self._unload_idle(deployment)
                except Exception:
                    # One failed unload must not end keep-alive for every model.
                    log.exception("unloading idle model %s failed", deployment.name)

    async def _unload_idle(self, deployment: Deployment) -> None:
        if self.deployments.get(deployment.name) is not deployment or not deployment.idle:
            return
        self.counters["idle_unloads"] += 1
        log.info(
            "unloading %s: idle for its keep-alive (%.0f s)", deployment.name, deployment.keep_alive
        )
        with contextlib.suppress(ModelNotFound, ModelExists):
            await self.unload(deployment.name)

    # ---- registry -------------------------------------------------------------------------

    async def register(self, spec: ModelSpec) -> None:
        """Adds a model that loads on its first request; its checkpoint is checked now. With
        `preload` it is loaded before this returns, and a failed load leaves it unregistered."""
        self._refuse_if_known(spec.name)
        await self.catalogue.open(self.catalogue.resolve(spec.path))
        self._refuse_if_known(spec.name)
        self.registry[spec.name] = spec
        if spec.preload:
            try:
                await self._start_auto_load(spec)
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
        self.lifecycle.forget(name)
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
            return ModelTokenizer(self.catalogue.resolve(spec.path))
        except CheckpointError as exc:
            raise CheckpointInvalid(str(exc)) from None

    # ---- views ----------------------------------------------------------------------------

    def model(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise ModelNotFound(f"model {name!r} is neither loaded nor registered")

    def models(self) -> list[ModelInfo]:
        infos = [deployment_info(d, self.admission, self.lifecycle) for d in self.deployments]
        for spec in self.registry.values():
            if spec.name not in self.deployments:
                infos.append(self._registered_info(spec))
        return infos

    def _registered_info(self, spec: ModelSpec) -> ModelInfo:
        try:
            in_host_cache = str(self.catalogue.resolve(spec.path)) in self.stores
        except ControllerError:
            in_host_cache = False
        return registered_info(spec, in_host_cache, self.admission, self.lifecycle)

    def workers(self) -> list[WorkerInfo]:
        return [worker_info(handle, self.deployments, self.ledger) for handle in self.pool.handles]

    @property
    def queue_stats(self):
        return self.admission.stats

    @property
    def host_cache_bytes(self) -> int:
        return self.stores.used_bytes

    @property
    def host_cache_capacity_bytes(self) -> int:
        return self.stores.capacity_bytes

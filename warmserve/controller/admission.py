"""Admission: which requests a model takes, and the queue of those waiting for it to be loaded.

A request for a loaded model goes straight to it, unless that model yields its memory to a load
that waits for it (then the request waits for its reload, so that models that do not fit together
take turns in groups). A request for a registered model that is not loaded waits (first come, first served: every waiter shares the one load) while the load, and
any eviction it needs, makes room; it is refused only when the model's queue is full or its
deadline (`queue_timeout_s`) passes. A model admits `max_num_seqs + max_queued_requests`
requests at once, waiting ones included; more are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from warmserve.config import ModelSpec, ServerConfig
from warmserve.controller.deployment import Deployment, Deployments, DeploymentState
from warmserve.controller.errors import (
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    QueueTimeout,
)
from warmserve.controller.histograms import Histograms

log = logging.getLogger("warmserve.controller")
# How often a request for a model that yields its memory to a waiting load looks again.
YIELD_POLL_S = 0.02
# Upper bounds (seconds) of the queue-wait histogram's buckets.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class QueueStats:
    """Per model: requests waiting for a load now, and how long those that waited waited."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}
        self.waits = Histograms(QUEUE_WAIT_BUCKETS)  # labels: (model,)
        self.refused: dict[str, dict[str, int]] = {}  # model -> error code -> count

    def observe_wait(self, name: str, seconds: float) -> None:
        self.waits.observe((name,), seconds)

    def refuse(self, name: str, code: str) -> None:
        by_code = self.refused.setdefault(name, {})
        by_code[code] = by_code.get(code, 0) + 1


class Admission:
    def __init__(
        self,
        config: ServerConfig,
        deployments: Deployments,
        registry: dict[str, ModelSpec],
        start_load: Callable[[ModelSpec], asyncio.Task],
        counters: dict[str, int],
    ):
        self.config = config
        self.deployments = deployments
        self.registry = registry
        self.start_load = start_load
        self.stats = QueueStats()
        self.counters = counters
        self._admitted: dict[str, int] = {}  # model name -> requests running or waiting
        self._loads: dict[str, asyncio.Task] = {}

    @contextlib.asynccontextmanager
    async def admit(self, name: str):
        """Holds one of the model's admission slots while the request runs; yields its
        loaded deployment, waiting for a load where needed."""
        admitted = self._admitted.get(name, 0)
        limit = self.config.engine.max_num_seqs + self.config.max_queued_requests
        if admitted >= limit:
            self.stats.refuse(name, Overloaded.code)
            log.info("refused a request for %s: %d running or queued", name, admitted)
            raise Overloaded(
                f"model {name!r} has {admitted} requests running or queued, the most it takes; "
                "retry later"
            )
        self._admitted[name] = admitted + 1
        try:
            yield await self._serving(name)
        finally:
            self._admitted[name] -= 1
            if not self._admitted[name]:
                del self._admitted[name]

    async def _serving(self, name: str) -> Deployment:
        deployment = self.deployments.get(name)
        if deployment is not None and deployment.serving:
            return deployment  # the common case: no queue, no wait
        arrived = time.monotonic()
        self.stats.waiting[name] = self.stats.waiting.get(name, 0) + 1
        try:
            deployment = await self._wait_until_loaded(name, arrived + self.config.queue_timeout_s)
        except (QueueTimeout, ModelUnavailable) as exc:
            self.stats.refuse(name, exc.code)
            log.info("refused a request for %s: %s", name, exc)
            raise
        finally:
            self.stats.waiting[name] -= 1
        self.stats.observe_wait(name, time.monotonic() - arrived)
        return deployment

    async def _wait_until_loaded(self, name: str, deadline: float) -> Deployment:
        while time.monotonic() < deadline:
            deployment = self.deployments.get(name)
            registered = name in self.registry
            if deployment is None or (deployment.state == DeploymentState.FAILED and registered):
                if not registered:
                    raise ModelNotFound(f"model {name!r} is neither loaded nor registered")
                # A load that started for earlier waiters may give up on its own deadline;
                # this request then starts another until its own deadline.
                with contextlib.suppress(QueueTimeout):
                    await _until(self._shared_load(name), deadline)
                continue
            if deployment.serving:
                return deployment
            if deployment.state == DeploymentState.LOADED:  # yielding to a waiting load
                await asyncio.sleep(YIELD_POLL_S)
            elif deployment.state == DeploymentState.LOADING:
                await _until(deployment.settled.wait(), deadline)
            elif deployment.state == DeploymentState.UNLOADING and registered:
                await _until(deployment.removed.wait(), deadline)
            elif deployment.state == DeploymentState.FAILED:
                raise ModelUnavailable(
                    f"model {name!r} failed ({deployment.error}); load it again to use it"
                )
            else:
                raise ModelUnavailable(f"model {name!r} is {deployment.state.value}")
        raise QueueTimeout(
            f"model {name!r} was not ready within the queue timeout "
            f"({self.config.queue_timeout_s:.0f} s); retry later"
        )

    async def _shared_load(self, name: str) -> None:
        """Loads a registered model; every waiter shares the one load."""
        task = self._loads.get(name)
        if task is None:
            self.counters["auto_loads"] += 1
            log.info("auto-loading %s for a waiting request", name)
            task = self.start_load(self.registry[name])
            self._loads[name] = task
            task.add_done_callback(lambda _: self._loads.pop(name, None))
        # ModelExists: loaded by someone else in the meantime; the caller looks again.
        with contextlib.suppress(ModelExists):
            await asyncio.shield(task)

    def queued(self, name: str) -> int:
        return self.stats.waiting.get(name, 0)


async def _until(awaitable, deadline: float) -> None:
    """Awaits until done or the deadline; errors of the awaited propagate."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return
    finally:
        if not task.done():
            task.cancel()

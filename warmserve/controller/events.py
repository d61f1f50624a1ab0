"""Routes what workers report to whoever it concerns: replies to the command channel, tokens and
failures to the deployment they name, memory figures to the ledger, step times to the step
histograms."""

from __future__ import annotations

from warmserve.controller.channel import CommandChannel
from warmserve.controller.deployment import Deployments
from warmserve.controller.histograms import Histograms
from warmserve.controller.host_stores import LocalStores
from warmserve.controller.lifecycle import Lifecycle
from warmserve.controller.memory import MemoryLedger
from warmserve.controller.pool import WorkerPool
from warmserve.protocol import (
    CommandDone,
    KVUsage,
    MemoryReleased,
    ModelLost,
    ModelWarm,
    RegisterSegment,
    RequestFailed,
    SegmentRegistered,
    StepOutputs,
    WorkerReady,
)

# Upper bounds (seconds) of the engine-step histogram's buckets: a small model's decode graph
# takes about a millisecond, a long prefill of a large one hundreds.
ENGINE_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)


class EventRouter:
    def __init__(
        self,
        pool: WorkerPool,
        channel: CommandChannel,
        ledger: MemoryLedger,
        deployments: Deployments,
        lifecycle: Lifecycle,
        stores: LocalStores,
        step_stats: Histograms,
    ):
        self.pool = pool
        self.channel = channel
        self.ledger = ledger
        self.deployments = deployments
        self.lifecycle = lifecycle
        self.stores = stores
        self.step_stats = step_stats  # labels: (model, step kind)
        # shm name -> workers that registered that host-store segment for DMA
        self.registered_segments: dict[str, set[int]] = {}

    def __call__(self, event) -> None:
        if isinstance(event, StepOutputs):
            deployment = self.deployments.by_id(event.deployment)
            if deployment is not None and deployment.client is not None:
                for output in event.outputs:
                    deployment.client.deliver(output)
            if deployment is not None and event.step_kind:
                self.step_stats.observe((deployment.name, event.step_kind), event.step_seconds)
        elif isinstance(event, CommandDone):
            self.pool.handles[event.worker_id].memory_used_bytes = event.memory_used_bytes
            self.ledger.measured(event.worker_id, event.memory_free_bytes)
            self.channel.resolve(event)
        elif isinstance(event, RequestFailed):
            deployment = self.deployments.by_id(event.deployment)
            if deployment is not None and deployment.client is not None:
                deployment.client.fail(event.request_id, event.error, event.invalid_request)
        elif isinstance(event, WorkerReady):
            self.ledger.worker_ready(event.worker_id, event.memory_usable_bytes)
            # A replacement worker maps its node's store's segments like the others did.
            for segment in self.stores.segments(self.pool.handles[event.worker_id].node):
                self.pool.send(event.worker_id, RegisterSegment(segment))
            self.lifecycle.room_changed()
        elif isinstance(event, MemoryReleased):
            self.pool.handles[event.worker_id].memory_used_bytes = event.memory_used_bytes
            self.ledger.measured(event.worker_id, event.memory_free_bytes)
            self.lifecycle.room_changed()
        elif isinstance(event, KVUsage):
            handle = self.pool.handles[event.worker_id]
            handle.kv_pool_free_bytes = event.pool_free_bytes
            handle.kv_by_deployment = {
                key: (kv.mapped_bytes, kv.used_bytes) for key, kv in event.models.items()
            }
            for key, kv in event.models.items():
                deployment = self.deployments.by_id(key)
                if deployment is not None:
                    deployment.kv_held_bytes = kv.held_beyond_footprint_bytes
            self.ledger.measured(event.worker_id, event.memory_free_bytes)
            self.lifecycle.room_changed()  # blocks the caches gave up may be what a load waits for
        elif isinstance(event, ModelWarm):
            deployment = self.deployments.by_id(event.deployment)
            if deployment is not None and deployment.warm_seconds is None:
                deployment.warm_seconds = event.seconds
        elif isinstance(event, SegmentRegistered):
            self.registered_segments.setdefault(event.shm_name, set()).add(event.worker_id)
        elif isinstance(event, ModelLost):
            deployment = self.deployments.by_id(event.deployment)
            if deployment is not None:
                self.lifecycle.fail(deployment, f"worker {event.worker_id}: {event.error}")

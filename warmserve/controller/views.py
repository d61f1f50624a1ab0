"""What the controller shows of its models and workers (the admin API, `warmserve ps`, metrics)."""

from __future__ import annotations

from warmserve.config import ModelSpec
from warmserve.controller.admission import Admission
from warmserve.controller.deployment import Deployment, Deployments
from warmserve.controller.lifecycle import Lifecycle
from warmserve.controller.memory import MemoryLedger
from warmserve.controller.pool import WorkerHandle
from warmserve.controller.types import ModelInfo, ResidentModel, WorkerInfo


def deployment_info(
    deployment: Deployment, admission: Admission, lifecycle: Lifecycle
) -> ModelInfo:
    client = deployment.client
    return ModelInfo(
        name=deployment.name,
        path=deployment.path,
        state=deployment.state.value,
        workers=list(deployment.workers),
        tensor_parallel_size=deployment.tensor_parallel_size,
        dtype=deployment.dtype,
        max_model_len=client.max_model_len if client else deployment.requested_max_model_len,
        load_source=deployment.load_source,
        load_seconds=deployment.load_seconds,
        warm_seconds=deployment.warm_seconds,
        last_used=deployment.last_used,
        requests_in_flight=deployment.in_flight,
        requests_queued=admission.queued(deployment.name),
        memory_bytes=deployment.memory_bytes,
        keep_alive=deployment.keep_alive,
        pinned=deployment.pinned,
        evictions=lifecycle.evictions_by_model.get(deployment.name, 0),
        error=deployment.error,
    )


def registered_info(
    spec: ModelSpec, in_host_cache: bool, admission: Admission, lifecycle: Lifecycle
) -> ModelInfo:
    """A registered model that is not loaded."""
    return ModelInfo(
        name=spec.name,
        path=spec.path,
        state="host-cache" if in_host_cache else "disk",
        tensor_parallel_size=spec.tensor_parallel_size,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        last_used=lifecycle.last_used(spec.name),
        requests_queued=admission.queued(spec.name),
        keep_alive=spec.keep_alive,
        pinned=spec.pinned,
        evictions=lifecycle.evictions_by_model.get(spec.name, 0),
    )


def worker_info(handle: WorkerHandle, deployments: Deployments, ledger: MemoryLedger) -> WorkerInfo:
    return WorkerInfo(
        id=handle.id,
        pid=handle.pid,
        device=handle.device,
        node=handle.node,
        state=handle.state,
        models=[
            ResidentModel(
                d.name,
                ledger.held(handle.id, d.id),
                d.state.value,
                *handle.kv_by_deployment.get(d.id, (0, 0)),
            )
            for d in deployments.on_worker(handle.id)
        ],
        memory_total_bytes=handle.memory_total_bytes,
        memory_used_bytes=handle.memory_used_bytes,
        memory_idle_bytes=handle.memory_idle_bytes,
        memory_usable_bytes=ledger.usable(handle.id),
        memory_free_bytes=ledger.free(handle.id),
        kv_pool_free_bytes=handle.kv_pool_free_bytes,
    )

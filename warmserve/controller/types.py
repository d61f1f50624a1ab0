"""Plain results the controller hands to its callers (the HTTP layer, the CLI, Python users)."""

from __future__ import annotations

from dataclasses import dataclass, field

from warmserve.controller.engine_client import GenerationChunk

__all__ = ["GenerationChunk", "LoadResult", "ModelInfo", "ResidentModel", "WorkerInfo"]


@dataclass(frozen=True)
class LoadResult:
    name: str
    workers: list[int]
    load_seconds: float
    source: str  # "disk" or "host-cache"
    worker_phases: dict = field(default_factory=dict)  # the lead worker's load, by phase


@dataclass
class ModelInfo:
    name: str
    path: str
    state: str  # loading | loaded | unloading | failed, or host-cache | disk when not loaded
    workers: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    load_source: str | None = None
    load_seconds: float | None = None
    # After the load, until the model's step kernels are compiled and its decode graphs
    # captured in the worker's idle gaps (None until then, and while not loaded).
    warm_seconds: float | None = None
    last_used: float | None = None  # unix time
    requests_in_flight: int = 0
    requests_queued: int = 0  # waiting for this model's load
    port: int | None = None
    memory_bytes: int = 0
    keep_alive: float = -1.0  # seconds idle before an automatic unload; -1 = never
    pinned: bool = False
    evictions: int = 0  # times it was evicted to make room for another model
    error: str | None = None  # why a failed model failed


@dataclass
class ResidentModel:
    name: str
    memory_bytes: int  # its footprint on this worker (weights, activations, minimum KV cache)
    state: str  # loading | loaded | unloading | failed
    kv_mapped_bytes: int = 0  # its KV cache now: pages of the worker's pool it has mapped
    kv_used_bytes: int = 0  # of which blocks that sequences hold


@dataclass
class WorkerInfo:
    id: int
    pid: int | None
    device: str
    node: str  # its host: "local", or the Ray node id on a cluster
    state: str  # starting | ready | dead
    models: list[ResidentModel]
    memory_total_bytes: int  # the device's memory
    memory_used_bytes: int  # what the worker process holds (its baseline included)
    memory_idle_bytes: int  # what the worker held with no model (its baseline)
    memory_usable_bytes: int  # what models may take on this worker, all together
    memory_free_bytes: int  # usable and not taken: room for another model
    kv_pool_free_bytes: int = 0  # what the models' KV caches may still map without reclaiming

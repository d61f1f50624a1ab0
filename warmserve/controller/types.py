"""Plain results the controller hands to its callers (the HTTP layer, the CLI, Python users)."""

from __future__ import annotations

from dataclasses import dataclass, field

from warmserve.controller.engine_client import GenerationChunk

__all__ = ["GenerationChunk", "LoadResult", "ModelInfo", "WorkerInfo"]


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
    last_used: float | None = None  # unix time
    requests_in_flight: int = 0
    port: int | None = None
    memory_bytes: int = 0
    keep_alive: float = -1.0  # seconds idle before an automatic unload; -1 = never
    pinned: bool = False
    error: str | None = None  # why a failed model failed


@dataclass
class WorkerInfo:
    id: int
    pid: int | None
    device: str
    state: str  # starting | idle | loading | loaded | unloading | dead
    model: str | None
    memory_total_bytes: int
    memory_used_bytes: int  # model weights + KV cache held by this worker
    memory_idle_bytes: int  # what the worker used with no model (its baseline)

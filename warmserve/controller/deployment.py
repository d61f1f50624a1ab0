"""One model placed on workers: its record and the states it goes through."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from warmserve.controller.engine_client import EngineClient
from warmserve.controller.pool import WorkerHandle
from warmserve.controller.tokenizer import ModelTokenizer


class DeploymentState(str, enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Deployment:
    id: str  # unique per load: the workers know the model by it
    name: str
    path: str
    tensor_parallel_size: int
    dtype: str
    requested_max_model_len: int | None
    state: DeploymentState = DeploymentState.LOADING
    # The worker processes it was placed on. A dead worker's replacement is a new handle at the
    # same id, which this deployment never owns.
    handles: list[WorkerHandle] = field(default_factory=list)
    workers_released: bool = False  # its workers dropped it (happens once)
    tokenizer: ModelTokenizer | None = None
    client: EngineClient | None = None
    load_source: str | None = None
    load_seconds: float | None = None
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float | None = None  # unix time
    # Per worker: what the model takes there (an estimate until the worker reports it).
    memory_bytes: int = 0
    # Per worker: KV cache its sequences hold beyond that footprint (the worker's last report).
    kv_held_bytes: int = 0
    error: str | None = None
    # Seconds from the end of its load until its workers had compiled its step kernels and
    # captured its decode graphs (None until then): a request meanwhile may wait for that work.
    warm_seconds: float | None = None
    keep_alive: float = -1.0  # seconds idle before an automatic unload; -1 = never
    pinned: bool = False  # never evicted
    evictable: bool = False  # registered models make room for others; explicit loads stay
    # A load waits for this model's memory: new requests for it wait (for its reload) instead of
    # keeping it busy forever, so that the waiting model's requests get their turn.
    yielding: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when loading ends
    removed: asyncio.Event = field(default_factory=asyncio.Event)  # set when it leaves

    @property
    def eviction_frees_bytes(self) -> int:
        """What its eviction frees on each of its workers: its footprint and the KV cache its
        sequences hold beyond it (the worker's free memory counts that as taken)."""
        return self.memory_bytes + self.kv_held_bytes

    @property
    def workers(self) -> list[int]:
        return [handle.id for handle in self.handles]

    @property
    def lead(self) -> WorkerHandle:
        return self.handles[0]

    @property
    def in_flight(self) -> int:
        return self.client.in_flight if self.client is not None else 0

    @property
    def idle(self) -> bool:
        return self.state == DeploymentState.LOADED and self.in_flight == 0

    @property
    def serving(self) -> bool:
        """Whether new requests may go to it now."""
        return self.state == DeploymentState.LOADED and not self.yielding

    @property
    def may_make_room(self) -> bool:
        """Whether it may be evicted for another model (once idle)."""
        return self.evictable and not self.pinned


class Deployments:
    """The current deployments, by model name and by deployment id (how workers name them)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Deployment] = {}
        self._by_id: dict[str, Deployment] = {}

    def add(self, deployment: Deployment) -> None:
        self._by_name[deployment.name] = deployment
        self._by_id[deployment.id] = deployment

    def remove(self, deployment: Deployment) -> bool:
        """Forgets it if it is still the current deployment of its name."""
        self._by_id.pop(deployment.id, None)
        if self._by_name.get(deployment.name) is deployment:
            del self._by_name[deployment.name]
            return True
        return False

    def get(self, name: str) -> Deployment | None:
        return self._by_name.get(name)

    def by_id(self, deployment_id: str) -> Deployment | None:
        return self._by_id.get(deployment_id)

    def on_worker(self, worker_id: int) -> list[Deployment]:
        """The deployments that worker still holds (not those it was told to drop)."""
        return [
            d for d in self._by_name.values() if worker_id in d.workers and not d.workers_released
        ]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(list(self._by_name.values()))

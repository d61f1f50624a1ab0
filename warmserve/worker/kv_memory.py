"""The worker's memory with its KV pool: the pool sized from what the resident models' weights
leave free, room made for a load, and the figures the worker reports (what another model could
take, each model's cache).

A resident model's footprint (what placement counts) is its weights, activation reserve and the
KV cache it always keeps; the rest of its cache is the pool's, and another model may take it
back as long as no sequence holds it. So the memory free for another model is usable memory less
the footprints, less the KV blocks in use beyond each model's minimum.
"""

from __future__ import annotations

import time

from warmserve.engine.engine import Engine
from warmserve.engine.kv_pool import KVPool
from warmserve.protocol import KVUsage, ModelKV
from warmserve.worker.device_memory import DeviceMemory

REPORT_INTERVAL_S = 0.5


class KVMemory:
    def __init__(self, memory: DeviceMemory):
        self.memory = memory
        self.pool: KVPool | None = None
        self.last_report: tuple | None = None
        self.next_report = 0.0

    def start(self) -> None:
        """After the warm-up: the pool takes what no model uses."""
        room = self.memory.room if self.memory.on_gpu else None
        self.pool = KVPool.for_device(self.memory.device, self.memory.usable(), room)

    # ---- loads ----------------------------------------------------------------------------

    def make_room(self, deployment: str, need_bytes: int) -> bool:
        """Sets `need_bytes` aside for a model about to be built (its weights, activations and
        first blocks), from idle pool pages and the other models' unused blocks; False when
        blocks in use leave too little (nothing is set aside then)."""
        if self.pool.claim(deployment, need_bytes):
            return True
        self.pool.drop_claim(deployment)
        return False

    def forget(self, deployment: str) -> None:
        self.pool.drop_claim(deployment)

    @property
    def retiring(self) -> bool:
        """An unloaded model's cache range is still mapped (see KVPool.retire)."""
        return self.pool is not None and bool(self.pool.retiring)

    def kv_budget(self, others: list[Engine]) -> int:
        """The most a new model's weights, activations and KV cache may ever take: usable
        memory less the other models' footprints (their KV beyond that is elastic)."""
        return self.memory.usable() - sum(engine.footprint_bytes for engine in others)

    # ---- figures --------------------------------------------------------------------------

    def free(self, engines: list[Engine]) -> int:
        busy_kv = sum(_kv_held_beyond_minimum(engine) for engine in engines)
        footprints = sum(engine.footprint_bytes for engine in engines)
        return self.memory.free(footprints + busy_kv, self._reclaimable_bytes())

    def used(self, engines: list[Engine]) -> int:
        fixed = sum(engine.fixed_bytes for engine in engines)
        if self.pool is None:
            return self.memory.used(fixed, 0)
        return self.memory.used(
            fixed + self.pool.mapped_pages * self.pool.page_bytes,
            self.pool.total_pages * self.pool.page_bytes,
        )

    def _reclaimable_bytes(self) -> int:
        if self.pool is None:
            return 0
        pages = len(self.pool.idle) + sum(r.reclaimable_pages() for r in self.pool.regions)
        return pages * self.pool.page_bytes

    def report(self, worker_id: int, engines: dict[str, Engine]) -> KVUsage | None:
        """The pool's figures when they changed since the last report (and it is time)."""
        now = time.monotonic()
        if self.pool is None or now < self.next_report:
            return None
        self.next_report = now + REPORT_INTERVAL_S
        models = {
            key: ModelKV(
                engine.kv_region.mapped_bytes,
                engine.kv_region.used_bytes,
                _kv_held_beyond_minimum(engine),
            )
            for key, engine in engines.items()
        }
        pool_free = self.pool.free_bytes or 0
        figures = (pool_free, tuple(models.items()))
        if figures == self.last_report:
            return None
        self.last_report = figures
        return KVUsage(worker_id, pool_free, self.free(list(engines.values())), models)


def _kv_held_beyond_minimum(engine: Engine) -> int:
    region = engine.kv_region
    held = region.mapped_bytes - region.reclaimable_pages() * region.pool.page_bytes
    return max(0, held - region.min_bytes)

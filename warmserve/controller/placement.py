"""The resource allocator: which idle workers take a model that needs `tp` workers and a given
number of bytes on each."""

from __future__ import annotations

from warmserve.controller.errors import InvalidRequest, NoCapacity
from warmserve.controller.pool import WorkerHandle

GIB = 2**30


def choose_workers(handles: list[WorkerHandle], tp: int, bytes_per_worker: int) -> list[int]:
    if tp > len(handles):
        raise InvalidRequest(
            f"tensor_parallel_size {tp} needs {tp} workers; this server has {len(handles)}"
        )
    if all(h.memory_total_bytes - h.memory_idle_bytes < bytes_per_worker for h in handles):
        largest = max(h.memory_total_bytes - h.memory_idle_bytes for h in handles)
        raise InvalidRequest(
            f"the model needs {bytes_per_worker / GIB:.2f} GiB per worker; the largest worker "
            f"has {largest / GIB:.2f} GiB (try a larger tensor_parallel_size)"
        )
    fitting = [
        h.id
        for h in handles
        if h.state == "idle" and h.memory_total_bytes - h.memory_idle_bytes >= bytes_per_worker
    ]
    if len(fitting) < tp:
        busy = ", ".join(
            f"worker {h.id}: {h.model or h.state}" for h in handles if h.state != "idle"
        )
        raise NoCapacity(
            f"no room: the model needs {tp} free worker(s), {len(fitting)} free ({busy})"
        )
    return fitting[:tp]

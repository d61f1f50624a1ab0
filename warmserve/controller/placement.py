"""The resource allocator: which workers take a model that needs `tp` workers and a number of
bytes on each, and which idle models to evict when none has room. Pure Python.

Workers are shared: single-worker models go wherever memory is free, beside tensor-parallel
models too. A tensor-parallel model of size k takes an aligned block of k workers (0..k-1,
k..2k-1, ...), and a worker holds the groups of one size only, so two groups on one worker always
span the same workers and have the same lead (the block's first worker). That is what keeps the
workers free of deadlock: a lead waits in a collective only for the other workers of its block,
and those take steps, group formations and releases from that one lead alone, in the order it
sent them (worker/peers.py), and never wait in a collective of their own meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from warmserve.controller.deployment import Deployment, DeploymentState
from warmserve.controller.errors import InvalidRequest

GIB = 2**30


@dataclass(frozen=True)
class WorkerRoom:
    """One live worker as placement sees it."""

    id: int
    usable_bytes: int
    free_bytes: int
    residents: tuple[Deployment, ...]  # loading, loaded or unloading there

    def conflicts(self, tp: int) -> list[Deployment]:
        """The tensor-parallel residents that a group of size `tp` may not join here (none for a
        single-worker model)."""
        if tp == 1:
            return []
        return [d for d in self.residents if d.tensor_parallel_size not in (1, tp)]


def check_fits_at_all(rooms: list[WorkerRoom], worker_count: int, tp: int, need: int) -> None:
    """Refuses (400) a model that could never be placed, whatever were evicted."""
    if tp > worker_count:
        raise InvalidRequest(
            f"tensor_parallel_size {tp} needs {tp} workers; this server has {worker_count}"
        )
    largest = max((room.usable_bytes for room in rooms), default=0)
    if need > largest:
        raise InvalidRequest(
            f"the model needs {need / GIB:.2f} GiB per worker; the largest worker has "
            f"{largest / GIB:.2f} GiB usable (try a larger tensor_parallel_size, a smaller "
            "max_model_len, or raise --gpu-memory-utilization / --worker-memory-gb)"
        )


def blocks(rooms: list[WorkerRoom], tp: int) -> list[list[WorkerRoom]]:
    """The aligned blocks of `tp` live workers that a tensor-parallel model may take, in worker
    order (a block's first worker is the model's lead)."""
    by_id = {room.id: room for room in rooms}
    top = max(by_id, default=-1)
    found = []
    for start in range(0, top + 1, tp):
        block = [by_id.get(worker) for worker in range(start, start + tp)]
        if all(room is not None for room in block):
            found.append(block)
    return found


def choose_workers(rooms: list[WorkerRoom], tp: int, need: int) -> list[int] | None:
    """Workers with room now: for one worker, the one with the most free memory (spreading
    models, and their traffic, over the pool); for a tensor-parallel model, the block whose
    fullest worker has the most free memory, among the blocks no group of another size holds."""
    if tp > 1:
        fitting = [
            block
            for block in blocks(rooms, tp)
            if all(room.free_bytes >= need and not room.conflicts(tp) for room in block)
        ]
        if not fitting:
            return None
        best = max(fitting, key=lambda block: min(room.free_bytes for room in block))
        return [room.id for room in best]
    fitting = [room for room in rooms if room.free_bytes >= need]
    if not fitting:
        return None
    return [max(fitting, key=lambda room: room.free_bytes).id]


def choose_evictions(
    rooms: list[WorkerRoom], tp: int, need: int, evictable: Iterable[Deployment]
) -> list[Deployment]:
    """The least recently used evictable models whose eviction makes room, on the worker (or
    workers) where that evicts the least recently used set; empty when no eviction makes room.
    A model on several workers frees its bytes on each of them; a tensor-parallel model's block
    also loses the groups of other sizes that hold part of it."""
    allowed = {id(d) for d in evictable}
    plans: list[tuple[float, list[Deployment]]] = []
    for block in blocks(rooms, tp) if tp > 1 else [[room] for room in rooms]:
        victims: list[Deployment] = []
        for room in block:
            found = _least_recently_used_until(room, tp, need, allowed)
            if found is None:
                break
            victims += [d for d in found if d not in victims]
        else:
            newest = max((_last_used(d) for d in victims), default=0.0)
            plans.append((newest, victims))
    plans.sort(key=lambda plan: plan[0])
    return plans[0][1] if plans else []


def _least_recently_used_until(
    room: WorkerRoom, tp: int, need: int, allowed: set[int]
) -> list[Deployment] | None:
    """The room's groups that conflict with a group of size `tp`, then its least recently used
    models until `need` bytes are free; None when what may go is not enough."""
    victims = room.conflicts(tp)
    if not all(id(d) in allowed for d in victims):
        return None
    free = room.free_bytes + sum(d.eviction_frees_bytes for d in victims)
    for deployment in sorted(room.residents, key=_last_used):
        if free >= need:
            break
        if id(deployment) not in allowed or deployment in victims:
            continue
        victims.append(deployment)
        free += deployment.eviction_frees_bytes
    return victims if free >= need else None


def _last_used(deployment: Deployment) -> float:
    return deployment.last_used or 0.0


def no_room_message(name: str, need: int, rooms: list[WorkerRoom]) -> str:
    holders = sorted(
        {
            f"{d.name} ({d.memory_bytes / GIB:.2f} GiB, {'pinned' if d.pinned else 'explicit'})"
            for room in rooms
            for d in room.residents
            if not d.may_make_room
        }
    )
    return (
        f"no room for model {name!r} ({need / GIB:.2f} GiB per worker): the memory is held by "
        f"pinned or explicitly loaded models: {', '.join(holders) or 'none'}; unload one of them"
    )


def room_may_come(rooms: list[WorkerRoom], tp: int, need: int) -> bool:
    """Whether memory held now may be freed without anyone unloading a pinned or explicit
    model: by models that may make room (once idle), or by unloads under way."""

    def may_come(room: WorkerRoom) -> bool:
        going = [
            d for d in room.residents if d.may_make_room or d.state == DeploymentState.UNLOADING
        ]
        if any(d not in going for d in room.conflicts(tp)):
            return False
        return room.free_bytes + sum(d.eviction_frees_bytes for d in going) >= need

    candidates = blocks(rooms, tp) if tp > 1 else [[room] for room in rooms]
    return any(all(may_come(room) for room in block) for block in candidates)

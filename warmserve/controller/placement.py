"""The resource allocator: which workers take a model that needs `tp` workers and a number of
bytes on each, and which idle models to evict when none has room. Pure Python.

Workers live on nodes (hosts). A model goes preferably to a node whose host weight store already
holds it (its load is then a copy from memory, not a disk read), and a tensor-parallel group
stays within one node unless the model needs more workers than any node has."""

from __future__ import annotations

from collections import defaultdict
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
    node: str = "local"

    @property
    def exclusive(self) -> bool:
        """Held by a tensor-parallel model, which takes its workers alone."""
        return any(d.tensor_parallel_size > 1 for d in self.residents)


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


def choose_workers(
    rooms: list[WorkerRoom], tp: int, need: int, preferred: Iterable[str] = ()
) -> list[int] | None:
    """Workers with room now, on a `preferred` node (whose store holds the model) if one has
    room: for one worker, the one with the most free memory (spreading models, and their
    traffic, over the pool); a tensor-parallel model takes empty workers of one node."""
    preferred = set(preferred)
    if tp > 1:
        empty = [room for room in rooms if not room.residents and room.free_bytes >= need]
        groups = [group for group in _by_node(empty).values() if len(group) >= tp]
        if groups:
            best = max(groups, key=lambda group: (group[0].node in preferred, len(group)))
            return [room.id for room in sorted(best, key=lambda r: -r.free_bytes)[:tp]]
        if fits_one_node(rooms, tp) or len(empty) < tp:
            return None
        # More workers than any node has: whole nodes first, the fewest nodes.
        sizes = {node: len(group) for node, group in _by_node(empty).items()}
        ordered = sorted(empty, key=lambda r: (-sizes[r.node], r.node, -r.free_bytes))
        return [room.id for room in ordered[:tp]]
    fitting = [room for room in rooms if not room.exclusive and room.free_bytes >= need]
    if not fitting:
        return None
    return [max(fitting, key=lambda room: (room.node in preferred, room.free_bytes)).id]


def fits_one_node(rooms: list[WorkerRoom], tp: int) -> bool:
    """Whether some node has `tp` workers: then a tensor-parallel group stays on one node."""
    return any(len(group) >= tp for group in _by_node(rooms).values())


def _by_node(rooms: Iterable[WorkerRoom]) -> dict[str, list[WorkerRoom]]:
    groups: dict[str, list[WorkerRoom]] = defaultdict(list)
    for room in rooms:
        groups[room.node].append(room)
    return groups


def choose_evictions(
    rooms: list[WorkerRoom], tp: int, need: int, evictable: Iterable[Deployment]
) -> list[Deployment]:
    """The least recently used evictable models whose eviction makes room, on the worker (or
    workers) where that evicts the least recently used set; empty when no eviction makes room.
    A model on several workers frees its bytes on each of them."""
    allowed = {id(d) for d in evictable}
    plans: list[tuple[float, str, list[Deployment]]] = []
    for room in rooms:
        if tp > 1:
            if not all(id(d) in allowed for d in room.residents):
                continue
            victims = sorted(room.residents, key=_last_used)
            if room.free_bytes + sum(d.memory_bytes for d in victims) < need:
                continue
        else:
            if room.exclusive and not all(id(d) in allowed for d in room.residents):
                continue
            victims = _least_recently_used_until(room, need, allowed)
            if victims is None:
                continue
        newest = max((_last_used(d) for d in victims), default=0.0)
        plans.append((newest, room.node, victims))
    plans.sort(key=lambda plan: plan[0])
    if tp > 1:
        return _group_evictions(plans, tp, fits_one_node(rooms, tp))
    return plans[0][2] if plans else []


def _group_evictions(
    plans: list[tuple[float, str, list[Deployment]]], tp: int, one_node: bool
) -> list[Deployment]:
    """The `tp` workers to empty for a tensor-parallel model (on one node when it fits one):
    those whose victims were used least recently."""
    if one_node:
        per_node = [group[:tp] for group in _plans_by_node(plans).values() if len(group) >= tp]
        if not per_node:
            return []
        chosen_plans = min(per_node, key=lambda group: max(plan[0] for plan in group))
    elif len(plans) < tp:
        return []
    else:
        chosen_plans = plans[:tp]
    chosen: list[Deployment] = []
    for _, _, victims in chosen_plans:
        chosen += [d for d in victims if d not in chosen]
    return chosen


def _plans_by_node(plans):
    groups = defaultdict(list)
    for plan in plans:
        groups[plan[1]].append(plan)
    return groups


def _least_recently_used_until(
    room: WorkerRoom, need: int, allowed: set[int]
) -> list[Deployment] | None:
    free = room.free_bytes
    victims: list[Deployment] = []
    for deployment in sorted(room.residents, key=_last_used):
        if free >= need and not room.exclusive:
            break
        if id(deployment) not in allowed:
            continue
        victims.append(deployment)
        free += deployment.memory_bytes
    if free < need or (room.exclusive and len(victims) < len(room.residents)):
        return None
    return victims


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
    possible: dict[str, int] = defaultdict(int)
    for room in rooms:
        going = [
            d for d in room.residents if d.may_make_room or d.state == DeploymentState.UNLOADING
        ]
        # A tensor-parallel model needs its workers empty; nothing joins one that holds it.
        if (tp > 1 or room.exclusive) and len(going) < len(room.residents):
            continue
        if room.free_bytes + sum(d.memory_bytes for d in going) >= need:
            possible[room.node] += 1
    if tp > 1 and fits_one_node(rooms, tp):
        return any(count >= tp for count in possible.values())
    return sum(possible.values()) >= tp

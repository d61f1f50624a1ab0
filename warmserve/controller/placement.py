"""The resource allocator: which workers take a model that needs `tp` workers and a number of
bytes on each, and which idle models to evict when none has room. Pure Python.

Workers live on nodes (hosts). A model goes preferably to a node whose host weight store already
holds it (its load is then a copy from memory, not a disk read).

Workers are shared: single-worker models go wherever memory is free, beside tensor-parallel
models too. A tensor-parallel model of size k takes a block of k workers of one node: each node's
workers in id order, cut into runs of k (every worker of the pool counts, ready or not, so the
blocks never shift while a worker restarts). A worker holds the groups of one size only, so two
groups on one worker always span the same workers and have the same lead (the block's first
worker). That is what keeps the workers free of deadlock: a lead waits in a collective only for
the other workers of its block, and those take steps, group formations and releases from that one
lead alone, in the order it sent them (worker/peers.py), and never wait in a collective of their
own meanwhile.

A model that needs more workers than any node has spans nodes: whole nodes first, the fewest
nodes. Such a group holds its workers alone among groups (single-worker models may stay beside
it), which keeps it free of deadlock without blocks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from warmserve.config import GIB
from warmserve.controller.deployment import Deployment, DeploymentState
from warmserve.controller.errors import InvalidRequest


@dataclass(frozen=True)
class WorkerRoom:
    """One worker of the pool as placement sees it; one that is not ready takes nothing."""

    id: int
    usable_bytes: int
    free_bytes: int
    residents: tuple[Deployment, ...]  # loading, loaded or unloading there
    node: str = "local"
    ready: bool = True

    def conflicts(self, tp: int, spanning: bool = False) -> list[Deployment]:
        """The tensor-parallel residents that a group of size `tp` may not join here (none for a
        single-worker model): groups of another size and groups that span nodes; a group that
        spans nodes (`spanning`) joins no group."""
        if tp == 1:
            return []
        return [
            d
            for d in self.residents
            if d.tensor_parallel_size > 1
            and (spanning or d.tensor_parallel_size != tp or _spans_nodes(d))
        ]


def check_fits_at_all(rooms: list[WorkerRoom], worker_count: int, tp: int, need: int) -> None:
    """Refuses (400) a model that could never be placed, whatever were evicted."""
    if tp > worker_count:
        raise InvalidRequest(
            f"tensor_parallel_size {tp} needs {tp} workers; this server has {worker_count}"
        )
    largest = max((room.usable_bytes for room in rooms if room.ready), default=0)
    if need > largest:
        raise InvalidRequest(
            f"the model needs {need / GIB:.2f} GiB per worker; the largest worker has "
            f"{largest / GIB:.2f} GiB usable (try a larger tensor_parallel_size, a smaller "
            "max_model_len, or raise --gpu-memory-utilization / --worker-memory-gb)"
        )


def node_blocks(rooms: list[WorkerRoom], tp: int) -> list[list[WorkerRoom]]:
    """The blocks of `tp` workers that a tensor-parallel model may take within a node, in worker
    order (a block's first worker is the model's lead); a node's last, shorter run takes no
    group of this size. `rooms`: every worker of the pool, so that the blocks stay put."""
    found = []
    for group in _by_node(rooms).values():
        ordered = sorted(group, key=lambda room: room.id)
        found += [ordered[start : start + tp] for start in range(0, len(ordered) - tp + 1, tp)]
    return sorted(found, key=lambda block: block[0].id)


def spans_nodes(rooms: list[WorkerRoom], tp: int) -> bool:
    """Whether a group of size `tp` must span nodes: no node has that many ready workers."""
    ready = [room for room in rooms if room.ready]
    return tp > 1 and not any(len(group) >= tp for group in _by_node(ready).values())


def choose_workers(
    rooms: list[WorkerRoom], tp: int, need: int, preferred: Iterable[str] = ()
) -> list[int] | None:
    """Workers with room now, on a `preferred` node (whose store holds the model) if one has
    room: for one worker, the one with the most free memory (spreading models, and their
    traffic, over the pool); for a tensor-parallel model, the block whose fullest worker has the
    most free memory, among the blocks no conflicting group holds."""
    preferred = set(preferred)
    ready = [room for room in rooms if room.ready]
    if tp == 1:
        fitting = [room for room in ready if room.free_bytes >= need]
        if not fitting:
            return None
        return [max(fitting, key=lambda room: (room.node in preferred, room.free_bytes)).id]
    if spans_nodes(rooms, tp):
        fitting = [r for r in ready if r.free_bytes >= need and not r.conflicts(tp, True)]
        if len(fitting) < tp:
            return None
        sizes = {node: len(group) for node, group in _by_node(fitting).items()}
        ordered = sorted(fitting, key=lambda r: (-sizes[r.node], r.node, -r.free_bytes))
        return [room.id for room in ordered[:tp]]
    fitting = [
        block
        for block in node_blocks(rooms, tp)
        if all(room.ready and room.free_bytes >= need and not room.conflicts(tp) for room in block)
    ]
    if not fitting:
        return None
    best = max(
        fitting,
        key=lambda block: (block[0].node in preferred, min(room.free_bytes for room in block)),
    )
    return [room.id for room in best]


def _units(rooms: list[WorkerRoom], tp: int) -> tuple[list[list[WorkerRoom]], int]:
    """What eviction plans and waits are counted over: ready workers alone (single-worker
    models, and groups that span nodes, which need `tp` of them) or whole ready blocks; and how
    many units a model needs."""
    if tp > 1 and not spans_nodes(rooms, tp):
        return [b for b in node_blocks(rooms, tp) if all(room.ready for room in b)], 1
    return [[room] for room in rooms if room.ready], tp


def choose_evictions(
    rooms: list[WorkerRoom], tp: int, need: int, evictable: Iterable[Deployment]
) -> list[Deployment]:
    """The least recently used evictable models whose eviction makes room, on the worker (or
    workers) where that evicts the least recently used set; empty when no eviction makes room.
    A model on several workers frees its bytes on each of them; a tensor-parallel model's
    workers also lose the groups that conflict with it."""
    allowed = {id(d) for d in evictable}
    spanning = spans_nodes(rooms, tp)
    units, needed = _units(rooms, tp)
    plans: list[tuple[float, list[Deployment]]] = []
    for unit in units:
        victims: list[Deployment] = []
        for room in unit:
            found = _least_recently_used_until(room, tp, need, allowed, spanning)
            if found is None:
                break
            victims += [d for d in found if d not in victims]
        else:
            newest = max((_last_used(d) for d in victims), default=0.0)
            plans.append((newest, victims))
    if len(plans) < needed:
        return []
    plans.sort(key=lambda plan: plan[0])
    chosen: list[Deployment] = []
    for _, victims in plans[:needed]:
        chosen += [d for d in victims if d not in chosen]
    return chosen


def _least_recently_used_until(
    room: WorkerRoom, tp: int, need: int, allowed: set[int], spanning: bool
) -> list[Deployment] | None:
    """The room's groups that conflict with a group of size `tp`, then its least recently used
    models until `need` bytes are free; None when what may go is not enough."""
    victims = room.conflicts(tp, spanning)
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


def _spans_nodes(deployment: Deployment) -> bool:
    return len({handle.node for handle in deployment.handles}) > 1


def _by_node(rooms: Iterable[WorkerRoom]) -> dict[str, list[WorkerRoom]]:
    groups: dict[str, list[WorkerRoom]] = defaultdict(list)
    for room in rooms:
        groups[room.node].append(room)
    return groups


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
    spanning = spans_nodes(rooms, tp)

    def may_come(room: WorkerRoom) -> bool:
        going = [
            d for d in room.residents if d.may_make_room or d.state == DeploymentState.UNLOADING
        ]
        if any(d not in going for d in room.conflicts(tp, spanning)):
            return False
        return room.free_bytes + sum(d.eviction_frees_bytes for d in going) >= need

    units, needed = _units(rooms, tp)
    return sum(all(may_come(room) for room in unit) for unit in units) >= needed

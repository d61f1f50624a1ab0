"""Tensor-parallel shards per node (controller/shards.py): each node's store keeps the spans of
the ranks on that node, and a later load copies them from there. Fake stores and workers."""

from __future__ import annotations

import asyncio

from test_placement import deployment

from warmserve.controller.host_stores import Lease
from warmserve.controller.launchers.base import WorkerSlot
from warmserve.controller.pool import WorkerHandle
from warmserve.controller.shards import lease_segments, store_shards
from warmserve.protocol import CommandDone, TensorEntry, WeightSegment

GIB = 2**30


class FakeStores:
    def __init__(self):
        self.held: dict[tuple[str, str], WeightSegment] = {}
        self.layouts: dict[str, list[list[TensorEntry]]] = {}
        self.finished: list[tuple[str, str, bool]] = []

    async def acquire(self, node, key):
        segment = self.held.get((node, key))
        return Lease(segment, "host-cache", None, lambda: None) if segment else None

    async def lease(self, node, key, checkpoint):
        return Lease(WeightSegment(f"{node}-checkpoint", 1, []), "disk", None, lambda: None)

    async def begin_shards(self, node, key, layout):
        segment = WeightSegment(f"{node}-shards", 1, [])
        self.held[(node, key)] = segment
        self.layouts[node] = layout
        return segment

    async def finish_shards(self, node, key, written):
        self.finished.append((node, key, written))


class FakeWorkers:
    """The channel and the pool: every command answered at once."""

    def __init__(self):
        self.sent: list[tuple[int, object]] = []
        self.broadcasts: list[tuple[object, str]] = []

    async def command(self, handles, build):
        commands = [build(index, index) for index in range(len(handles))]
        self.sent += [(h.id, c) for h, c in zip(handles, commands, strict=True)]
        return [CommandDone(h.id, c.command_id) for h, c in zip(handles, commands, strict=True)]

    def broadcast(self, command, node=None):
        self.broadcasts.append((command, node))


def group_on(*nodes: str):
    group = deployment("wide", GIB, 1.0, tp=len(nodes))
    group.handles = [
        WorkerHandle(i, WorkerSlot("cpu", node), "cpu") for i, node in enumerate(nodes)
    ]
    return group


def layout(name: str) -> list[TensorEntry]:
    return [TensorEntry(name, "float32", [4], 0, 16)]


def test_each_node_keeps_the_shards_of_its_ranks_and_a_reload_copies_them():
    group = group_on("a", "b", "b")
    stores, workers = FakeStores(), FakeWorkers()

    async def scenario():
        first = await lease_segments(stores, group, checkpoint=None)
        shards = [layout("r0"), layout("r1"), layout("r2")]
        await store_shards(stores, workers, workers, group, shards)
        return first, await lease_segments(stores, group, checkpoint=None)

    first, again = asyncio.run(scenario())
    assert {node: lease.segment.shm_name for node, lease in first.items()} == {
        "a": "a-checkpoint",
        "b": "b-checkpoint",
    }
    # Node b's segment spans ranks 1 and 2 (rank 0's span empty); each rank writes its own.
    assert stores.layouts == {
        "a": [layout("r0"), [], []],
        "b": [[], layout("r1"), layout("r2")],
    }
    assert [(worker, command.rank) for worker, command in workers.sent] == [(0, 0), (1, 1), (2, 2)]
    assert [(node, written) for node, _, written in stores.finished] == [("a", True), ("b", True)]
    registered = [(command.segment.shm_name, node) for command, node in workers.broadcasts]
    assert registered == [("a-shards", "a"), ("b-shards", "b")]
    assert {node: lease.segment.shm_name for node, lease in again.items()} == {
        "a": "a-shards",
        "b": "b-shards",
    }


def test_a_node_whose_ranks_copied_shards_already_writes_none():
    group = group_on("a", "b")
    stores, workers = FakeStores(), FakeWorkers()
    asyncio.run(store_shards(stores, workers, workers, group, [[], layout("r1")]))
    assert list(stores.layouts) == ["b"]
    assert [worker for worker, _ in workers.sent] == [1]

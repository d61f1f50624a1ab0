"""Placement over the nodes of a cluster, and which workers a cluster's nodes take: pure Python,
no workers, no Ray."""

from __future__ import annotations

import pytest
from test_placement import deployment

from warmserve.controller.launchers.base import WorkerSlot
from warmserve.controller.launchers.cluster_plan import ClusterNode, joined_workers, plan_workers
from warmserve.controller.placement import (
    WorkerRoom,
    choose_evictions,
    choose_workers,
    room_may_come,
)
from warmserve.controller.pool import StartupError

GIB = 2**30


def room(worker_id: int, node: str, free_gb: float, *residents) -> WorkerRoom:
    return WorkerRoom(worker_id, 10 * GIB, int(free_gb * GIB), residents, node)


def test_a_model_goes_to_a_node_whose_store_holds_it_even_with_less_free_memory():
    rooms = [room(0, "a", 9), room(1, "b", 3)]
    assert choose_workers(rooms, 1, GIB) == [0]
    assert choose_workers(rooms, 1, GIB, preferred={"b"}) == [1]
    assert choose_workers(rooms, 1, 5 * GIB, preferred={"b"}) == [0]  # b has no room for it


def test_a_tensor_parallel_group_stays_on_one_node():
    # Two empty workers in all, but on two nodes of two workers each: the group waits.
    busy = deployment("busy", GIB, 1.0)
    rooms = [room(0, "a", 9), room(1, "a", 9, busy), room(2, "b", 9), room(3, "b", 9, busy)]
    assert choose_workers(rooms, 2, GIB) is None
    assert not room_may_come(rooms, 2, 9.5 * GIB)
    rooms[3] = room(3, "b", 9)
    assert sorted(choose_workers(rooms, 2, GIB)) == [2, 3]
    # Among nodes with room, the one whose store holds the model.
    rooms[1] = room(1, "a", 9)
    assert sorted(choose_workers(rooms, 2, GIB, preferred={"a"})) == [0, 1]


def test_a_group_larger_than_any_node_spans_nodes_whole_nodes_first():
    rooms = [room(0, "a", 9), room(1, "a", 9), room(2, "b", 9), room(3, "c", 9), room(4, "c", 9)]
    # No node has three workers: the group takes node a whole, then one of c's.
    assert sorted(choose_workers(rooms, 3, GIB)) == [0, 1, 3]
    rooms.append(room(5, "c", 9))  # now node c has three: the group stays there
    assert sorted(choose_workers(rooms, 3, GIB)) == [3, 4, 5]


def test_evictions_for_a_group_empty_workers_of_one_node():
    old = [deployment(f"old{i}", 9 * GIB, float(i)) for i in range(4)]
    # The two least recently used models are on different nodes: evicting them would leave
    # no node with two empty workers; node b's pair is evicted instead.
    rooms = [room(0, "a", 1, old[0]), room(1, "a", 1, old[3]), room(2, "b", 1, old[1]),
             room(3, "b", 1, old[2])]  # fmt: skip
    victims = choose_evictions(rooms, 2, 5 * GIB, old)
    assert {d.name for d in victims} == {"old1", "old2"}


def test_workers_spread_over_the_nodes_with_their_share_of_cores():
    nodes = [ClusterNode("head", "10.0.0.1", 0, 8), ClusterNode("other", "10.0.0.2", 0, 4)]
    assert plan_workers(nodes, "cpu", 3) == [
        WorkerSlot("cpu", "head", 4),
        WorkerSlot("cpu", "head", 4),
        WorkerSlot("cpu", "other", 4),
    ]
    gpus = [ClusterNode("head", "10.0.0.1", 2, 8), ClusterNode("other", "10.0.0.2", 1, 4)]
    assert [s.node for s in plan_workers(gpus, "cuda", None)] == ["head", "head", "other"]
    assert (
        joined_workers(ClusterNode("new", "10.0.0.3", 4, 8), "cuda")
        == [WorkerSlot("cuda:0", "new")] * 4
    )
    with pytest.raises(StartupError, match="no GPU"):
        plan_workers(nodes, "cuda", None)
    with pytest.raises(StartupError, match="3 GPU"):
        plan_workers(gpus, "cuda", 4)

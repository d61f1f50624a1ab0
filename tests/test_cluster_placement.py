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
from warmserve.controller.pool import StartupError, WorkerHandle

GIB = 2**30


def room(worker_id: int, node: str, free_gb: float, *residents) -> WorkerRoom:
    return WorkerRoom(worker_id, 10 * GIB, int(free_gb * GIB), residents, node)


def test_a_model_goes_to_a_node_whose_store_holds_it_even_with_less_free_memory():
    rooms = [room(0, "a", 9), room(1, "b", 3)]
    assert choose_workers(rooms, 1, GIB) == [0]
    assert choose_workers(rooms, 1, GIB, preferred={"b"}) == [1]
    assert choose_workers(rooms, 1, 5 * GIB, preferred={"b"}) == [0]  # b has no room for it


def test_a_tensor_parallel_group_takes_a_block_of_one_node():
    # Workers 0 and 3 have room, but on two nodes: each node's block has a full worker.
    rooms = [room(0, "a", 9), room(1, "a", 2), room(2, "b", 2), room(3, "b", 9)]
    assert choose_workers(rooms, 2, 5 * GIB) is None
    assert not room_may_come(rooms, 2, 5 * GIB)
    # A block shares its workers with single-worker models; among blocks with room, the one on
    # the node whose store holds the model.
    small = deployment("small", GIB, 1.0)
    rooms[1] = room(1, "a", 8, small)
    assert choose_workers(rooms, 2, GIB) == [0, 1]
    assert choose_workers(rooms, 2, GIB, preferred={"b"}) == [2, 3]


def test_blocks_are_cut_per_node_and_stay_put_while_a_worker_restarts():
    # Node b's workers are 1 and 2: a block, though 0..1 would be the pool's first pair.
    rooms = [room(0, "a", 9), room(1, "b", 9), room(2, "b", 9)]
    assert choose_workers(rooms, 2, GIB) == [1, 2]
    # Worker 2 restarts (not ready): its block waits; 1 never pairs with 3 meanwhile, which
    # would put two groups of one size with different leads on worker 3.
    rooms = [room(0, "a", 9), room(1, "b", 9), room(2, "b", 9), room(3, "b", 9), room(4, "b", 9)]
    rooms[2] = WorkerRoom(2, 0, 0, (), "b", ready=False)
    assert choose_workers(rooms, 2, GIB) == [3, 4]


def test_a_group_larger_than_any_node_spans_nodes_whole_nodes_first():
    rooms = [room(0, "a", 9), room(1, "a", 9), room(2, "b", 9), room(3, "c", 9), room(4, "c", 9)]
    # No node has three workers: the group takes node a whole, then one of c's.
    assert choose_workers(rooms, 3, GIB) == [0, 1, 3]
    # That group holds its workers alone among groups: another group of three finds no room,
    # a pair (which fits a node) no block, until it goes.
    wide = spanning_group("wide", {0: "a", 1: "a", 3: "c"})
    rooms = [room(r.id, r.node, 8, wide) if r.id in (0, 1, 3) else r for r in rooms]
    assert choose_workers(rooms, 3, GIB) is None
    assert choose_workers(rooms, 2, GIB) is None
    assert choose_evictions(rooms, 2, GIB, [wide]) == [wide]
    # Once node c has three workers, groups of three stay there.
    rooms = [room(0, "a", 9), room(1, "a", 9), room(2, "b", 9)]
    rooms += [room(3, "c", 9), room(4, "c", 9), room(5, "c", 9)]
    assert choose_workers(rooms, 3, GIB) == [3, 4, 5]


def spanning_group(name: str, workers: dict[int, str]):
    group = deployment(name, GIB, 1.0, tp=len(workers))
    group.handles = [
        WorkerHandle(worker, WorkerSlot("cpu", node), "cpu") for worker, node in workers.items()
    ]
    return group


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

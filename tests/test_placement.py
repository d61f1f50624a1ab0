"""Placement by memory, the memory ledger, eviction choice and fair stepping: pure Python, no
workers."""

from __future__ import annotations

import pytest

from warmserve.controller.deployment import Deployment, DeploymentState
from warmserve.controller.errors import InvalidRequest
from warmserve.controller.memory import MemoryLedger
from warmserve.controller.placement import (
    WorkerRoom,
    check_fits_at_all,
    choose_evictions,
    choose_workers,
    room_may_come,
)
from warmserve.controller.policies import evictable_now
from warmserve.worker.fair_share import FairShare

GIB = 2**30


def deployment(name, nbytes, last_used, tp=1, evictable=True, pinned=False) -> Deployment:
    return Deployment(
        id=f"{name}-1",
        name=name,
        path=name,
        tensor_parallel_size=tp,
        dtype="auto",
        requested_max_model_len=None,
        state=DeploymentState.LOADED,
        memory_bytes=nbytes,
        last_used=last_used,
        evictable=evictable,
        pinned=pinned,
        loaded_at=0.0,
    )


def test_ledger_free_is_the_smaller_of_ledger_and_measurement():
    ledger = MemoryLedger()
    ledger.worker_ready(0, 10 * GIB)
    assert ledger.free(0) == 10 * GIB
    ledger.hold(0, "a", 4 * GIB)  # a load under way: the worker has not counted it yet
    assert ledger.free(0) == 6 * GIB
    ledger.measured(0, 5 * GIB)  # the worker measured after building a (and something else)
    ledger.settle(0, "a", 4 * GIB)
    assert ledger.free(0) == 5 * GIB
    ledger.release(0, "a")
    ledger.measured(0, 9 * GIB)
    assert ledger.free(0) == 9 * GIB
    ledger.worker_gone(0)
    assert ledger.free(0) == 0


def test_one_worker_models_go_where_most_memory_is_free():
    rooms = [WorkerRoom(0, 10 * GIB, 3 * GIB, ()), WorkerRoom(1, 10 * GIB, 7 * GIB, ())]
    assert choose_workers(rooms, 1, 2 * GIB) == [1]
    assert choose_workers(rooms, 1, 8 * GIB) is None


def test_tensor_parallel_models_share_workers_in_aligned_blocks():
    wide = deployment("wide", 2 * GIB, 1.0, tp=2)  # on workers 0 and 1
    small = deployment("small", GIB, 1.0)
    rooms = [
        WorkerRoom(0, 10 * GIB, 8 * GIB, (wide,)),
        WorkerRoom(1, 10 * GIB, 7 * GIB, (wide, small)),
        WorkerRoom(2, 10 * GIB, 3 * GIB, ()),
        WorkerRoom(3, 10 * GIB, 9 * GIB, ()),
    ]
    assert choose_workers(rooms[:2], 1, GIB) == [0]  # beside the group
    # A second group of two joins the block with room ({2, 3} has 3 GiB on its fuller worker),
    # with the same lead as the first.
    assert choose_workers(rooms, 2, 4 * GIB) == [0, 1]
    assert choose_workers(rooms, 2, GIB) == [0, 1]
    assert choose_workers(rooms, 2, 8 * GIB) is None
    # A group of another size never overlaps one: four workers are free only once wide goes.
    assert choose_workers(rooms, 4, GIB) is None
    assert choose_evictions(rooms, 4, GIB, [wide, small]) == [wide]
    assert choose_evictions(rooms, 4, GIB, [small]) == []
    assert choose_evictions(rooms, 2, 8 * GIB, [wide, small]) == [wide]


def test_a_model_no_worker_could_ever_hold_is_refused_with_figures():
    rooms = [WorkerRoom(0, 4 * GIB, 4 * GIB, ())]
    with pytest.raises(InvalidRequest, match="needs 5.00 GiB per worker; the largest worker"):
        check_fits_at_all(rooms, 1, 1, 5 * GIB)
    with pytest.raises(InvalidRequest, match="needs 2 workers"):
        check_fits_at_all(rooms, 1, 2, GIB)


def test_evictions_free_just_enough_least_recently_used_models():
    old, middle, new = (deployment(n, 3 * GIB, t) for n, t in (("old", 1), ("mid", 2), ("new", 3)))
    rooms = [WorkerRoom(0, 10 * GIB, GIB, (new, old, middle))]
    assert choose_evictions(rooms, 1, 4 * GIB, [old, middle, new]) == [old]
    assert choose_evictions(rooms, 1, 6 * GIB, [old, middle, new]) == [old, middle]
    # Only what may be evicted counts: with old held (pinned, busy...), middle and new go.
    assert choose_evictions(rooms, 1, 6 * GIB, [middle, new]) == [middle, new]
    assert choose_evictions(rooms, 1, 11 * GIB, [old, middle, new]) == []


def test_an_eviction_frees_the_kv_cache_its_sequences_held_beyond_its_footprint():
    # The worker counts a busy model's grown KV cache as taken: 3 GiB footprint + 2 GiB held
    # leave 1 GiB free of 6; evicting it frees all 5.
    busy = deployment("busy", 3 * GIB, 1.0)
    busy.kv_held_bytes = 2 * GIB
    rooms = [WorkerRoom(0, 6 * GIB, GIB, (busy,))]
    assert choose_evictions(rooms, 1, 5 * GIB, [busy]) == [busy]
    assert room_may_come(rooms, 1, 6 * GIB)
    assert not room_may_come(rooms, 1, 7 * GIB)


def test_evictions_prefer_the_worker_whose_models_were_used_longest_ago():
    stale, fresh = deployment("stale", 4 * GIB, 1.0), deployment("fresh", 4 * GIB, 9.0)
    rooms = [WorkerRoom(0, 5 * GIB, GIB, (fresh,)), WorkerRoom(1, 5 * GIB, GIB, (stale,))]
    assert choose_evictions(rooms, 1, 3 * GIB, [stale, fresh]) == [stale]


def test_only_idle_registered_unpinned_models_past_their_residency_may_go():
    idle = deployment("idle", GIB, 1.0)
    pinned = deployment("pinned", GIB, 1.0, pinned=True)
    explicit = deployment("explicit", GIB, 1.0, evictable=False)
    recent = deployment("recent", GIB, 1.0)
    recent.loaded_at = 99.5
    loading = deployment("loading", GIB, 1.0)
    loading.state = DeploymentState.LOADING
    candidates = [idle, pinned, explicit, recent, loading]
    assert evictable_now(candidates, min_residency_s=1.0, now=100.0) == [idle]
    assert evictable_now(candidates, min_residency_s=0.0, now=100.0) == [idle, recent]


def test_fair_share_steps_the_model_with_the_least_weighted_time():
    share = FairShare()
    share.add("a")
    share.add("b", weight=2.0)
    steps = []
    for _ in range(30):
        key = share.pick(["a", "b"])
        steps.append(key)
        share.charge(key, 0.01)
    # b weighs twice as much: it gets about twice the steps.
    assert 18 <= steps.count("b") <= 22


def test_fair_share_gives_no_credit_for_idle_time():
    share = FairShare()
    share.add("busy")
    share.add("quiet")
    for _ in range(100):
        share.charge(share.pick(["busy"]), 0.01)
    # quiet wakes up: it may go first, but must not then hold the device for a second.
    picks = []
    for _ in range(10):
        key = share.pick(["busy", "quiet"])
        picks.append(key)
        share.charge(key, 0.01)
    assert picks.count("busy") >= 4


def test_fair_share_carries_no_debt_across_an_idle_spell():
    """A model that took a long step (its first, behind its load's copy) and then went idle
    does not wait, when the others and it wake together, while they make up for that step."""
    share = FairShare()
    for key in "abc":
        share.add(key)
    share.charge(share.pick(["a"]), 2.0)  # a's first step waited two seconds for its copy
    for key in "bc":
        share.charge(share.pick([key]), 0.01)
    picks = []
    for _ in range(9):
        key = share.pick(["a", "b", "c"])
        picks.append(key)
        share.charge(key, 0.01)
    assert picks.count("a") == 3

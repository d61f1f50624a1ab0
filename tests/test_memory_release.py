"""The deferred release of device memory after an unload: the worker wakes for it on time, and
the controller takes the memory figure the worker reports once it has released."""

from __future__ import annotations

import time

from support import run_controller

from warmserve.protocol import MemoryReleased, UnloadModel, WorkerArgs, event_decoder, event_encoder
from warmserve.worker.worker import IDLE_POLL_MS, Worker


def make_worker(delay: float = 0.25) -> Worker:
    args = WorkerArgs(
        worker_id=0,
        device="cpu",
        command_address="",
        event_address="",
        memory_cap_bytes=None,
        gpu_memory_utilization=0.9,
        memory_release_delay_s=delay,
        num_threads=None,
        parent_pid=0,
        peer_address="",
    )
    return Worker(args, commands=None, events=None)


def test_idle_worker_wakes_when_a_release_is_due():
    worker = make_worker()
    assert worker.idle_poll_ms() == IDLE_POLL_MS
    worker.release_due = time.monotonic() + 0.1
    assert 0 < worker.idle_poll_ms() <= 101
    worker.release_due = time.monotonic() - 1.0
    assert worker.idle_poll_ms() == 0


def test_cpu_unload_releases_nothing_later():
    worker = make_worker()
    replies = []
    worker.reply = lambda command_id, **fields: replies.append(fields)
    worker.take_unload(UnloadModel(1, "absent"))
    assert worker.release_due is None  # a CPU worker's memory goes with the model
    assert set(replies[0]["phases"]) == {"close_s", "leave_group_s"}


def test_controller_takes_the_released_figure():
    event = event_decoder.decode(event_encoder.encode(MemoryReleased(1, 12345, 6789)))
    assert event == MemoryReleased(1, 12345, 6789)

    async def scenario(controller):
        controller._on_event(event)
        assert controller.workers()[1].memory_used_bytes == 12345
        assert controller.workers()[1].memory_free_bytes == 6789

    run_controller(scenario)

"""The controller under faults, with real worker processes: callers that give up, workers that
die at awkward moments, replacements that cannot start."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from support import run_controller

from warmserve import SamplingParams
from warmserve.controller.errors import ModelExists, ModelUnavailable
from warmserve.worker.worker import FAIL_WARMUP_ENV

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def generate_all(controller, name, params=SHORT) -> int:
    count = 0
    async for chunk in controller.generate(name, [1, 2, 3], params):
        count += len(chunk.token_ids)
    return count


def state(controller, name: str) -> str | None:
    deployment = controller.deployments.get(name)
    return deployment.state if deployment else None


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_callers_that_give_up_leave_no_model_half_loaded_or_half_unloaded(checkpoints):
    async def scenario(controller):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(controller.load("a", str(checkpoints["llama"])), 0.001)
        await until(lambda: state(controller, "a") == "loaded")
        # A request in flight makes the unload drain; its caller stops waiting meanwhile.
        held = controller.generate("a", [1, 2, 3], LONG)
        await anext(held)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(controller.unload("a"), 0.05)
        assert state(controller, "a") == "unloading"
        with pytest.raises(ModelExists):  # double unload
            await controller.unload("a")
        with pytest.raises(ModelExists):  # load during an unload
            await controller.load("a", str(checkpoints["llama"]))
        async for _ in held:  # the request finishes within the grace period
            pass
        await until(lambda: "a" not in controller.deployments)
        assert [w.models for w in controller.workers()] == [[], []]
        assert all(w.memory_used_bytes == w.memory_idle_bytes for w in controller.workers())
        # An unload during a load waits for the load, then unloads.
        loading = asyncio.ensure_future(controller.load("a", str(checkpoints["llama"])))
        await until(lambda: "a" in controller.deployments)
        await controller.unload("a")
        assert (await loading).name == "a" and "a" not in controller.deployments

    run_controller(scenario, unload_grace_s=30.0)


def test_a_worker_dying_during_an_unload_never_touches_the_next_model(checkpoints):
    """A tensor-parallel model unloads (draining a request) when one of its workers dies: the
    survivor is freed at once and takes the next model; the end of the first unload must not
    unload that next model from it."""

    async def scenario(controller):
        await controller.load("wide", str(checkpoints["llama"]), tensor_parallel_size=2)
        held = controller.generate("wide", [1, 2, 3], LONG)
        await anext(held)  # never read again: the unload drains it for its whole grace period
        unloading = asyncio.ensure_future(controller.unload("wide"))
        await until(lambda: state(controller, "wide") == "unloading")
        os.kill(controller.workers()[1].pid, signal.SIGKILL)
        await until(lambda: state(controller, "wide") == "failed")
        assert controller.workers()[0].models == []
        loaded = await controller.load("next", str(checkpoints["qwen3"]))
        assert loaded.workers == [0]
        await unloading
        await held.aclose()
        assert await generate_all(controller, "next") == SHORT.max_tokens
        assert [m.name for m in controller.workers()[0].models] == ["next"]

    run_controller(scenario, unload_grace_s=3.0)


def test_a_registered_model_whose_worker_died_loads_again_on_its_next_request(
    checkpoints, tmp_path
):
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  - name: r\n    path: {checkpoints['opt']}\n")

    async def scenario(controller):
        assert await generate_all(controller, "r") == SHORT.max_tokens
        os.kill(controller.workers()[controller.model("r").workers[0]].pid, signal.SIGKILL)
        await until(lambda: state(controller, "r") == "failed")
        assert await generate_all(controller, "r") == SHORT.max_tokens
        assert state(controller, "r") == "loaded"
        assert controller.counters["auto_loads"] == 2

    run_controller(scenario, models_file=str(registry))


def test_a_replacement_that_fails_its_warm_up_is_not_restarted_in_a_loop(checkpoints, monkeypatch):
    async def scenario(controller):
        await controller.load("a", str(checkpoints["qwen3"]))
        held = controller.generate("a", [1, 2, 3], LONG)
        await anext(held)
        # Workers spawned from now on inherit the fault.
        monkeypatch.setenv(FAIL_WARMUP_ENV, "1")
        os.kill(controller.workers()[0].pid, signal.SIGKILL)
        with pytest.raises(ModelUnavailable, match="worker 0 died"):
            async for _ in held:
                pass
        await until(lambda: controller.pool.generations[0] == 2, 30)
        await until(lambda: controller.workers()[0].state == "dead", 60)
        await asyncio.sleep(3)  # a restart loop would have spawned again by now
        assert controller.pool.generations[0] == 2
        assert controller.workers()[0].state == "dead"
        # The other worker serves on.
        await controller.load("b", str(checkpoints["opt"]))
        assert await generate_all(controller, "b") == SHORT.max_tokens

    run_controller(scenario)

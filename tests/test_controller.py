"""The worker pool and controller with real worker processes (CPU, two workers): the seeds'
three scenarios, placement by memory and the host weight store (tensor parallelism:
test_tensor_parallel.py)."""

from __future__ import annotations

import asyncio
import os

import pytest
from support import (
    GREEDY,
    ONE_MODEL_PER_WORKER_GB,
    PROMPTS,
    generate_ids,
    hf_greedy,
    run_controller,
)

from warmserve.controller.errors import (
    CheckpointInvalid,
    InvalidRequest,
    ModelExists,
    NoCapacity,
    PathForbidden,
)
from warmserve.controller.tokenizer import ModelTokenizer


def pids(controller) -> list[int]:
    return [worker.pid for worker in controller.workers()]


def resident(controller) -> list[list[str]]:
    return [[model.name for model in worker.models] for worker in controller.workers()]


def test_workers_start_warm_and_idle():
    async def scenario(controller):
        workers = controller.workers()
        assert [w.state for w in workers] == ["ready", "ready"]
        assert resident(controller) == [[], []]
        assert all(w.memory_free_bytes == w.memory_usable_bytes > 0 for w in workers)
        assert all(w.pid and w.pid != os.getpid() for w in workers)
        assert all(w.device == "cpu" and w.memory_total_bytes > 0 for w in workers)
        assert all(w.memory_used_bytes == w.memory_idle_bytes for w in workers)

    run_controller(scenario)


def test_lifecycle_load_generate_unload_reload(checkpoints):
    async def scenario(controller):
        before = pids(controller)
        first = await controller.load("a", str(checkpoints["qwen3"]))
        assert first.source == "disk" and first.workers == [0]
        output = await generate_ids(controller, "a", PROMPTS[0])
        worker = controller.workers()[0]
        assert resident(controller)[0] == ["a"]
        assert worker.memory_used_bytes > worker.memory_idle_bytes
        assert (
            worker.memory_free_bytes == worker.memory_usable_bytes - worker.models[0].memory_bytes
        )
        await controller.unload("a")
        worker = controller.workers()[0]
        assert resident(controller) == [[], []]
        assert worker.memory_used_bytes == worker.memory_idle_bytes
        again = await controller.load("a", str(checkpoints["qwen3"]))
        assert again.source == "host-cache"
        assert await generate_ids(controller, "a", PROMPTS[0]) == output
        assert pids(controller) == before

    run_controller(scenario)


def test_parallel_models_match_transformers(checkpoints):
    async def scenario(controller):
        await controller.load("a", str(checkpoints["qwen3"]))
        await controller.load("b", str(checkpoints["opt"]))
        jobs = [(name, prompt) for name in ("a", "b") for prompt in PROMPTS]
        outputs = await asyncio.gather(*(generate_ids(controller, n, p) for n, p in jobs))
        return jobs, outputs

    jobs, outputs = run_controller(scenario)
    paths = {"a": checkpoints["qwen3"], "b": checkpoints["opt"]}
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        prompt_ids = ModelTokenizer(paths[name]).encode(prompt)
        assert output == hf_greedy(paths[name], prompt_ids, GREEDY.max_tokens), (name, prompt)


def test_explicit_models_hold_their_memory_and_a_full_pool_says_who(checkpoints):
    async def scenario(controller):
        before = pids(controller)
        await controller.load("a", str(checkpoints["qwen3"]))
        await controller.load("b", str(checkpoints["opt"]))
        assert resident(controller) == [["a"], ["b"]]  # spread: each took the emptier worker
        reference_b = await generate_ids(controller, "b", PROMPTS[1])
        with pytest.raises(NoCapacity, match=r"pinned or explicitly loaded models: a .*b "):
            await controller.load("c", str(checkpoints["llama"]))
        with pytest.raises(ModelExists):
            await controller.load("a", str(checkpoints["qwen3"]))
        # The refused loads broke nothing.
        assert await generate_ids(controller, "b", PROMPTS[1]) == reference_b
        await controller.unload("a")
        loaded_c = await controller.load("c", str(checkpoints["llama"]))
        assert loaded_c.workers == [0]
        await controller.unload("b")
        reloaded_b = await controller.load("b", str(checkpoints["opt"]))
        assert reloaded_b.source == "host-cache" and reloaded_b.workers == [1]
        assert await generate_ids(controller, "b", PROMPTS[1]) == reference_b
        assert len(await generate_ids(controller, "c", PROMPTS[2])) == GREEDY.max_tokens
        assert pids(controller) == before
        assert {m.name: m.state for m in controller.models()} == {"c": "loaded", "b": "loaded"}

    run_controller(scenario, worker_memory_gb=ONE_MODEL_PER_WORKER_GB)


def test_a_model_larger_than_any_worker_is_refused_with_the_figures(checkpoints):
    async def scenario(controller):
        with pytest.raises(InvalidRequest, match=r"needs 0\.0\d GiB per worker; the largest"):
            await controller.load("a", str(checkpoints["qwen3"]))
        assert resident(controller) == [[], []]

    run_controller(scenario, worker_memory_gb=0.01)


def test_several_models_share_one_worker_and_each_matches_transformers(checkpoints):
    async def scenario(controller):
        before = pids(controller)
        for name, path in checkpoints.items():
            await controller.load(name, str(path))
        assert resident(controller) == [list(checkpoints)]
        jobs = [(name, prompt) for name in checkpoints for prompt in PROMPTS]
        outputs = await asyncio.gather(*(generate_ids(controller, n, p) for n, p in jobs))
        assert pids(controller) == before
        return jobs, outputs

    jobs, outputs = run_controller(scenario, workers=1)
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        prompt_ids = ModelTokenizer(checkpoints[name]).encode(prompt)
        assert output == hf_greedy(checkpoints[name], prompt_ids, GREEDY.max_tokens), name


def test_bad_checkpoint_and_forbidden_path_leave_workers_idle(checkpoints):
    root = checkpoints["qwen3"].parent
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"architectures": ["NoSuchModel"]}')

    async def scenario(controller):
        with pytest.raises(CheckpointInvalid, match="NoSuchModel"):
            await controller.load("x", str(broken))
        with pytest.raises(PathForbidden):
            await controller.load("y", "/etc")
        assert resident(controller) == [[], []]
        await controller.load("a", checkpoints["qwen3"].name)
        assert len(await generate_ids(controller, "a", PROMPTS[0])) == GREEDY.max_tokens

    run_controller(scenario, model_root=str(root))


def test_host_cache_evicts_least_recently_used_and_cleans_up(checkpoints):
    size = checkpoints["qwen3"].joinpath("model.safetensors").stat().st_size

    async def scenario(controller):
        await controller.load("qwen3", str(checkpoints["qwen3"]))
        await controller.load("opt", str(checkpoints["opt"]))
        await controller.unload("qwen3")
        await controller.load("llama", str(checkpoints["llama"]))
        # Budget holds two copies: the least recently used (qwen3) went.
        assert controller.host_cache_bytes <= controller.host_cache_capacity_bytes
        assert len(controller.stores.keys()) == 2
        assert str(checkpoints["qwen3"]) not in controller.stores
        return controller.instance

    instance = run_controller(scenario, host_cache_gb=2.5 * size / 2**30)
    assert not [f for f in os.listdir("/dev/shm") if instance in f]

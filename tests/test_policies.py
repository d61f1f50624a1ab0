"""Serverless policies with real workers: auto-load, keep-alive, LRU eviction, pinning."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import ONE_MODEL_PER_WORKER_GB, PROMPTS, hf_greedy

from warmserve import Controller, SamplingParams, ServerConfig
from warmserve.config import ModelSpec
from warmserve.controller.errors import ModelNotFound, NoCapacity
from warmserve.controller.tokenizer import ModelTokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def registry_file(tmp_path, checkpoints, **overrides) -> str:
    lines = ["models:"]
    for name, path in checkpoints.items():
        lines += [f"  - name: {name}", f"    path: {path}"]
        for key, value in overrides.get(name, {}).items():
            lines.append(f"    {key}: {value}")
    path = tmp_path / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(scenario, models_file, **overrides):
    """Two workers that hold one model each, as two GPUs hold one large model each."""
    settings = dict(
        device="cpu",
        workers=2,
        models_file=models_file,
        worker_memory_gb=ONE_MODEL_PER_WORKER_GB,
        min_residency_s=0.0,
    )

    async def main():
        config = ServerConfig(**{**settings, **overrides})
        async with Controller(config) as controller:
            return await scenario(controller)

    return asyncio.run(main())


async def generate_ids(controller, name, prompt, **kw) -> list[int]:
    tokens = []
    async for chunk in controller.generate(name, prompt, GREEDY, **kw):
        tokens.extend(chunk.token_ids)
    return tokens


def test_cycling_three_models_on_two_workers_evicts_and_stays_correct(checkpoints, tmp_path):
    names = list(checkpoints)
    schedule = [(names[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(9)]

    async def scenario(controller):
        pids = [w.pid for w in controller.workers()]
        outputs = [await generate_ids(controller, name, prompt) for name, prompt in schedule]
        assert [w.pid for w in controller.workers()] == pids
        return outputs, dict(controller.counters), {m.name: m.state for m in controller.models()}

    outputs, counters, states = run(scenario, registry_file(tmp_path, checkpoints))
    for (name, prompt), output in zip(schedule, outputs, strict=True):
        prompt_ids = ModelTokenizer(checkpoints[name]).encode(prompt)
        assert output == hf_greedy(checkpoints[name], prompt_ids, GREEDY.max_tokens)
    # Each request after the first two finds its model evicted: 7 evictions, 9 auto-loads.
    assert counters["evictions"] == 7 and counters["auto_loads"] == 9
    assert sorted(states.values()) == ["host-cache", "loaded", "loaded"]


def test_pinned_model_is_never_evicted(checkpoints, tmp_path):
    models_file = registry_file(tmp_path, checkpoints, qwen3={"pinned": "true"})

    async def scenario(controller):
        for name in ["qwen3", "opt", "llama", "opt", "llama"]:
            await generate_ids(controller, name, PROMPTS[0])
            assert controller.model("qwen3").state == "loaded"
        # The pinned model keeps its worker; the other two take turns on the second one.
        return dict(controller.counters)

    counters = run(scenario, models_file)
    assert counters["evictions"] == 3


def test_keep_alive_zero_unloads_after_the_request(checkpoints, tmp_path):
    models_file = registry_file(tmp_path, checkpoints, opt={"keep_alive": 0})

    async def scenario(controller):
        await generate_ids(controller, "opt", PROMPTS[0])
        await wait_for_state(controller, "opt", "host-cache")
        # A request's own keep_alive overrides the registry's.
        await generate_ids(controller, "llama", PROMPTS[0], keep_alive=0.0)
        await wait_for_state(controller, "llama", "host-cache")
        assert controller.counters["idle_unloads"] == 2

    run(scenario, models_file)


def test_idle_model_unloads_after_its_keep_alive(checkpoints, tmp_path):
    models_file = registry_file(tmp_path, checkpoints, opt={"keep_alive": "1s"})

    async def scenario(controller):
        await generate_ids(controller, "opt", PROMPTS[0])
        assert controller.model("opt").state == "loaded"
        started = time.monotonic()
        await wait_for_state(controller, "opt", "host-cache")
        assert time.monotonic() - started >= 0.5

    run(scenario, models_file)


def test_simultaneous_first_requests_share_one_load(checkpoints, tmp_path):
    async def scenario(controller):
        outputs = await asyncio.gather(
            *(generate_ids(controller, "qwen3", prompt) for prompt in PROMPTS)
        )
        assert controller.counters["auto_loads"] == 1
        assert all(len(output) == GREEDY.max_tokens for output in outputs)

    run(scenario, registry_file(tmp_path, checkpoints))


def test_runtime_registration_and_no_room_when_nothing_can_go(checkpoints, tmp_path):
    async def scenario(controller):
        await controller.load("fixed-a", str(checkpoints["qwen3"]))
        await controller.load("fixed-b", str(checkpoints["opt"]))
        await controller.register(ModelSpec(name="late", path=str(checkpoints["llama"])))
        assert controller.model("late").state == "disk"
        # Explicitly loaded models are never evicted: no room for the registered one.
        with pytest.raises(NoCapacity):
            await generate_ids(controller, "late", PROMPTS[0])
        await controller.unload("fixed-b")
        assert len(await generate_ids(controller, "late", PROMPTS[0])) == GREEDY.max_tokens
        await controller.unregister("late")
        with pytest.raises(ModelNotFound):
            await generate_ids(controller, "late", PROMPTS[0])

    run(scenario, None)


async def wait_for_state(controller, name, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while controller.model(name).state != state:
        assert time.monotonic() < deadline, f"{name} stayed {controller.model(name).state}"
        await asyncio.sleep(0.05)

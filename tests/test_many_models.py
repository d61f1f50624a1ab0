"""Several models resident on each worker, with real worker processes (CPU): streams that go on
while other models load and evict beside them, requests that queue for a load instead of being
refused, the queue's bounds, and requests served in groups rather than a swap per request."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from support import ONE_MODEL_PER_WORKER_GB, PROMPTS, hf_greedy

from warmserve import Controller, SamplingParams, ServerConfig
from warmserve.config import EngineConfig
from warmserve.controller.errors import Overloaded, QueueTimeout
from warmserve.controller.tokenizer import ModelTokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# Two of the tiny models (about 12 MB each) fit together in this worker; a third does not.
TWO_MODELS_GB = 0.028


def registry(tmp_path, checkpoints, names) -> str:
    lines = ["models:"]
    for name in names:
        lines += [f"  - name: {name}", f"    path: {checkpoints[name]}"]
    path = tmp_path / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(scenario, **settings):
    async def main():
        config = ServerConfig(**{"device": "cpu", "workers": 1, **settings})
        async with Controller(config) as controller:
            pids = [worker.pid for worker in controller.workers()]
            result = await scenario(controller)
            assert [worker.pid for worker in controller.workers()] == pids
            return result

    return asyncio.run(main())


async def generate_ids(controller, name, prompt, params=GREEDY) -> list[int]:
    tokens = []
    async for chunk in controller.generate(name, prompt, params):
        tokens.extend(chunk.token_ids)
    return tokens


def expected(checkpoints, name, prompt, max_tokens=GREEDY.max_tokens) -> list[int]:
    prompt_ids = ModelTokenizer(checkpoints[name]).encode(prompt)
    return hf_greedy(checkpoints[name], prompt_ids, max_tokens)


def test_a_stream_goes_on_while_other_models_load_and_evict_on_its_worker(checkpoints, tmp_path):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario(controller):
        await controller.load("qwen3", str(checkpoints["qwen3"]))
        stream = asyncio.ensure_future(generate_ids(controller, "qwen3", PROMPTS[0], long))
        others = []
        for name in ["opt", "llama", "opt", "llama"]:
            others.append((name, await generate_ids(controller, name, PROMPTS[1])))
            assert not stream.done(), "the stream should outlast the swaps beside it"
        return await stream, others, dict(controller.counters)

    models = registry(tmp_path, checkpoints, ["opt", "llama"])
    streamed, others, counters = run(
        scenario, models_file=models, worker_memory_gb=TWO_MODELS_GB, min_residency_s=0.0
    )
    assert streamed == expected(checkpoints, "qwen3", PROMPTS[0], 200)
    for name, output in others:
        assert output == expected(checkpoints, name, PROMPTS[1])
    assert counters["evictions"] == 3 and counters["auto_loads"] == 4


def test_requests_for_models_that_do_not_fit_together_queue_and_are_all_answered(
    checkpoints, tmp_path
):
    jobs = [(name, prompt) for prompt in PROMPTS for name in ("qwen3", "opt", "llama")]

    async def scenario(controller):
        outputs = await asyncio.gather(*(generate_ids(controller, n, p) for n, p in jobs))
        return outputs, dict(controller.counters), controller.queue_stats

    models = registry(tmp_path, checkpoints, ["qwen3", "opt", "llama"])
    outputs, counters, stats = run(
        scenario, models_file=models, worker_memory_gb=ONE_MODEL_PER_WORKER_GB
    )
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        assert output == expected(checkpoints, name, prompt), (name, prompt)
    # Each model's queued requests went together: one load each, no swap per request.
    assert counters["auto_loads"] == 3 and counters["evictions"] == 2
    assert sum(sum(counts) for counts in stats.waits.counts.values()) == len(jobs)


def test_a_full_queue_is_refused_at_once(checkpoints, tmp_path):
    async def scenario(controller):
        first = [asyncio.ensure_future(generate_ids(controller, "qwen3", p)) for p in PROMPTS[:2]]
        await asyncio.sleep(0)  # both are admitted and wait for the load
        with pytest.raises(Overloaded, match="2 requests running or queued"):
            await generate_ids(controller, "qwen3", PROMPTS[2])
        return [len(output) for output in await asyncio.gather(*first)]

    models = registry(tmp_path, checkpoints, ["qwen3"])
    lengths = run(
        scenario,
        models_file=models,
        max_queued_requests=1,
        engine=EngineConfig(max_num_seqs=1),
    )
    assert lengths == [GREEDY.max_tokens] * 2


def test_a_request_waiting_past_its_deadline_is_refused(checkpoints, tmp_path):
    busy = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)

    async def scenario(controller):
        held = controller.generate("qwen3", PROMPTS[0], busy)
        await anext(held)  # qwen3 is busy: it cannot make room for llama
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match="'llama'"):
            await generate_ids(controller, "llama", PROMPTS[1])
        waited = time.monotonic() - started
        await held.aclose()
        # Once qwen3 is idle it makes room: llama is served (a client retries after a 503).
        for _ in range(10):
            with contextlib.suppress(QueueTimeout):
                return waited, await generate_ids(controller, "llama", PROMPTS[1])
        raise AssertionError("llama was never served")

    models = registry(tmp_path, checkpoints, ["qwen3", "llama"])
    waited, output = run(
        scenario,
        models_file=models,
        worker_memory_gb=ONE_MODEL_PER_WORKER_GB,
        queue_timeout_s=1.0,
        min_residency_s=0.0,
    )
    assert 0.9 <= waited < 10
    assert output == expected(checkpoints, "llama", PROMPTS[1])


def test_alternating_clients_are_served_in_groups_not_a_swap_per_request(checkpoints, tmp_path):
    """Two clients, one model each, on a worker with room for one model: each client's
    requests are served in groups (a model stays its minimum residency), not a swap per
    request. A fixed number of requests, not a fixed time, so that a slow machine only
    stretches the run."""
    requests_per_client, residency_s = 8, 2.0

    async def client(controller, name, answers):
        for _ in range(requests_per_client):
            answers.append(await generate_ids(controller, name, PROMPTS[0]))

    async def scenario(controller):
        answers = {"qwen3": [], "opt": []}
        started = time.monotonic()
        await asyncio.gather(*(client(controller, name, out) for name, out in answers.items()))
        return answers, dict(controller.counters), time.monotonic() - started

    models = registry(tmp_path, checkpoints, ["qwen3", "opt"])
    answers, counters, elapsed_s = run(
        scenario,
        models_file=models,
        worker_memory_gb=ONE_MODEL_PER_WORKER_GB,
        min_residency_s=residency_s,
    )
    for name, outputs in answers.items():
        assert outputs and all(o == expected(checkpoints, name, PROMPTS[0]) for o in outputs)
    # A model stays at least its residency once loaded: no more swaps than that allows, and
    # far fewer than one per request.
    assert counters["evictions"] <= elapsed_s / residency_s + 2
    assert counters["evictions"] < requests_per_client


def test_a_model_kept_busy_yields_its_memory_to_a_waiting_one_in_turn(checkpoints, tmp_path):
    """Two clients keep qwen3 busy without a gap; opt needs its memory. qwen3 takes no new
    requests while opt waits, so it drains and goes; opt is served well within its deadline, and
    qwen3's clients are served again afterwards."""

    async def keep_busy(controller, stop: asyncio.Event, answers: list) -> None:
        while not stop.is_set():
            answers.append(await generate_ids(controller, "qwen3", PROMPTS[0]))

    async def scenario(controller):
        await generate_ids(controller, "qwen3", PROMPTS[0])
        stop, answers = asyncio.Event(), []
        clients = [asyncio.ensure_future(keep_busy(controller, stop, answers)) for _ in range(2)]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        other = await generate_ids(controller, "opt", PROMPTS[1])
        waited = time.monotonic() - started
        before = len(answers)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
        return other, waited, answers, before

    models = registry(tmp_path, checkpoints, ["qwen3", "opt"])
    other, waited, answers, before = run(
        scenario,
        models_file=models,
        worker_memory_gb=ONE_MODEL_PER_WORKER_GB,
        queue_timeout_s=20.0,
        min_residency_s=0.2,
    )
    assert other == expected(checkpoints, "opt", PROMPTS[1])
    assert waited < 20.0
    assert len(answers) > before, "qwen3's clients were not served again after opt's turn"
    assert all(answer == expected(checkpoints, "qwen3", PROMPTS[0]) for answer in answers)


def test_models_sharing_a_worker_draw_their_kv_caches_from_its_pool_and_report_them(
    checkpoints, tmp_path
):
    names = ("qwen3", "opt")
    jobs = [(name, prompt) for prompt in PROMPTS for name in names]

    async def kv_settled(controller):
        """The worker's figures once its last report shows every model's cache, none in use."""
        deadline = time.monotonic() + 30
        while True:
            worker = controller.workers()[0]
            caches = {model.name: model for model in worker.models}
            if all(caches[n].kv_mapped_bytes > 0 and caches[n].kv_used_bytes == 0 for n in names):
                return worker
            assert time.monotonic() < deadline, f"no KV report: {worker}"
            await asyncio.sleep(0.1)

    async def scenario(controller):
        for name in names:
            await controller.load(name, str(checkpoints[name]))
        outputs = await asyncio.gather(*(generate_ids(controller, n, p) for n, p in jobs))
        return outputs, await kv_settled(controller)

    # A minimum cache of one block: serving the batch makes the caches grow.
    outputs, worker = run(
        scenario, worker_memory_gb=TWO_MODELS_GB, engine=EngineConfig(min_kv_tokens=16)
    )
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        assert output == expected(checkpoints, name, prompt), (name, prompt)
    footprints = sum(model.memory_bytes for model in worker.models)
    assert 0 < worker.kv_pool_free_bytes <= worker.memory_usable_bytes - footprints
    # The caches' unused blocks count as free for another model.
    assert worker.memory_free_bytes == worker.memory_usable_bytes - footprints

"""Tensor parallelism with real worker processes (CPU, gloo, two workers): a model on both
workers answers exactly as on one and as transformers (float32), through swaps, beside
single-worker models on the same workers, with the worker processes never restarting."""

from __future__ import annotations

import asyncio

from support import GREEDY, PROMPTS, generate_ids, hf_greedy, run_controller

from warmserve.controller.launchers.local import LOCAL_NODE
from warmserve.controller.tokenizer import ModelTokenizer


async def answers(controller, name) -> list[list[int]]:
    return list(await asyncio.gather(*(generate_ids(controller, name, p) for p in PROMPTS)))


def pids(controller) -> list[int]:
    return [worker.pid for worker in controller.workers()]


def resident(controller) -> list[list[str]]:
    return [sorted(model.name for model in worker.models) for worker in controller.workers()]


def transformers_answers(path) -> list[list[int]]:
    tokenizer = ModelTokenizer(path)
    return [hf_greedy(path, tokenizer.encode(p), GREEDY.max_tokens) for p in PROMPTS]


def test_two_workers_answer_as_one_and_as_transformers_through_swaps(checkpoints):
    path = str(checkpoints["llama"])

    async def scenario(controller):
        before = pids(controller)
        await controller.load("solo", path)
        solo = await answers(controller, "solo")
        await controller.unload("solo")
        sharded = []
        for _ in range(3):  # the first load from the host cache, then swaps
            loaded = await controller.load("sharded", path, tensor_parallel_size=2)
            assert loaded.workers == [0, 1] and loaded.source == "host-cache"
            sharded.append(await answers(controller, "sharded"))
            await controller.unload("sharded")
        # The workers' groups are gone: two single-worker models take them, then TP=2 again.
        await controller.load("a", path)
        await controller.load("b", str(checkpoints["qwen3"]))
        assert resident(controller) == [["a"], ["b"]]
        singles = await answers(controller, "a")
        await controller.unload("a")
        await controller.unload("b")
        await controller.load("sharded", path, tensor_parallel_size=2)
        sharded.append(await answers(controller, "sharded"))
        assert pids(controller) == before
        return solo, sharded, singles

    solo, sharded, singles = run_controller(scenario)
    assert solo == transformers_answers(checkpoints["llama"])
    assert all(outputs == solo for outputs in sharded)
    assert singles == solo


def test_a_tensor_parallel_model_serves_beside_single_worker_models(checkpoints):
    """Two groups on the same two workers and one single-worker model on each, all answering at
    once: every rank serves its own models between the steps of the groups it belongs to."""
    paths = {
        "wide-llama": checkpoints["llama"],
        "wide-qwen3": checkpoints["qwen3"],
        "opt": checkpoints["opt"],
        "qwen3": checkpoints["qwen3"],
    }

    async def scenario(controller):
        before = pids(controller)
        await controller.load("wide-llama", str(paths["wide-llama"]), tensor_parallel_size=2)
        await controller.load("opt", str(paths["opt"]))
        await controller.load("wide-qwen3", str(paths["wide-qwen3"]), tensor_parallel_size=2)
        await controller.load("qwen3", str(paths["qwen3"]))
        assert resident(controller) == [
            ["opt", "wide-llama", "wide-qwen3"],
            ["qwen3", "wide-llama", "wide-qwen3"],
        ]
        together = await asyncio.gather(*(answers(controller, name) for name in paths))
        # A single-worker model comes and goes beside the groups; they keep answering.
        await controller.unload("opt")
        await controller.load("opt", str(paths["opt"]))
        again = await asyncio.gather(answers(controller, "wide-llama"), answers(controller, "opt"))
        assert pids(controller) == before
        return dict(zip(paths, together, strict=True)), again

    together, again = run_controller(scenario)
    expected = {name: transformers_answers(path) for name, path in paths.items()}
    assert together == expected
    assert again == [expected["wide-llama"], expected["opt"]]


def test_after_its_first_load_each_rank_loads_its_shard_in_one_copy(checkpoints):
    """The first load slices the checkpoint's tensors; the ranks then write their parameters
    into a segment of the host store, one contiguous span each in forward order, and every
    later load copies a rank's span in one piece and binds the parameters to it."""
    path = checkpoints["opt"]  # biases, a replicated row-parallel bias, learned positions

    async def scenario(controller):
        first = await controller.load("wide", str(path), tensor_parallel_size=2)
        before = await answers(controller, "wide")
        await controller.unload("wide")
        [shards] = [s for s in controller.stores.segments(LOCAL_NODE) if s.ranks]
        again = await controller.load("wide", str(path), tensor_parallel_size=2)
        return first.worker_phases, again, shards, before, await answers(controller, "wide")

    first_phases, again, shards, before, after = run_controller(scenario)
    assert "copy_issue_s" not in first_phases  # tensor by tensor
    assert again.source == "host-cache" and "copy_issue_s" in again.worker_phases  # one copy
    assert before == after == transformers_answers(path)
    rank0, rank1 = shards.ranks
    assert rank0.offset == 0 and rank0.size <= rank1.offset
    assert rank1.offset + rank1.size <= shards.size
    names = [entry.name for entry in rank0.tensors]
    assert names == [entry.name for entry in rank1.tensors]
    assert names[0].endswith("embed_tokens.weight")
    layers = [int(name.split("layers.")[1].split(".")[0]) for name in names if "layers." in name]
    assert layers == sorted(layers) and len(set(layers)) > 1
    for rank in (rank0, rank1):
        ends = [entry.offset + entry.nbytes for entry in rank.tensors]
        assert all(end <= nxt.offset for end, nxt in zip(ends, rank.tensors[1:], strict=False))
        assert ends[-1] == rank.size

"""Continuous batching, preemption and limits never change what a greedy request generates."""

from __future__ import annotations

import random

import pytest
from helpers import (
    Completion,
    assert_all_blocks_free,
    collect,
    generate_alone,
    make_engine,
    random_prompts,
    record_schedules,
    run_to_completion,
)

from warmserve.config import SamplingParams

NUM_REQUESTS = 32
MAX_PROMPT = 40
MAX_NEW_TOKENS = 20


def make_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    """32 greedy requests, each with its own prompt length (1-40) and max_tokens (1-20)."""
    rng = random.Random(1234)
    lengths = rng.sample(range(1, MAX_PROMPT + 1), NUM_REQUESTS)
    max_tokens = [1 + index % MAX_NEW_TOKENS for index in range(NUM_REQUESTS)]
    rng.shuffle(max_tokens)
    prompts = random_prompts(lengths, seed=1234)
    return {
        f"request-{index}": (
            prompt,
            SamplingParams(max_tokens=max_tokens[index], temperature=0.0, ignore_eos=True),
        )
        for index, prompt in enumerate(prompts)
    }


REQUESTS = make_requests()


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Both ways of stepping: each step resolved at once, or launched before the one before
    it is resolved (EngineConfig.async_scheduling)."""
    return request.param


@pytest.fixture(scope="module")
def solo_completions(llama_path) -> dict[str, Completion]:
    engine = make_engine(llama_path)
    completions = {}
    for request_id, (prompt, params) in REQUESTS.items():
        completion = generate_alone(engine, prompt, params)
        assert len(completion.token_ids) == params.max_tokens
        assert completion.finish_reason == "length"
        completions[request_id] = completion
    return completions


def add_all(engine, request_ids=REQUESTS) -> None:
    for request_id in request_ids:
        prompt, params = REQUESTS[request_id]
        engine.add_request(request_id, prompt, params)


def test_batched_requests_equal_their_solo_runs(llama_path, solo_completions, async_scheduling):
    engine = make_engine(llama_path, async_scheduling=async_scheduling)
    steps = record_schedules(engine)
    add_all(engine)

    assert run_to_completion(engine) == solo_completions
    assert len(steps[0]) == NUM_REQUESTS
    assert engine.scheduler.num_preemptions == 0
    assert_all_blocks_free(engine)


def test_preemption_recomputes_without_changing_outputs(
    llama_path, solo_completions, async_scheduling
):
    block_size = 8
    probe = make_engine(llama_path, block_size=block_size)
    bytes_per_block = probe.kv_region.block_bytes
    # Room for the longest request (60 tokens) and little more.
    num_blocks = 10
    engine = make_engine(
        llama_path,
        block_size=block_size,
        kv_cache_bytes=num_blocks * bytes_per_block,
        async_scheduling=async_scheduling,
    )
    assert engine.scheduler.block_manager.num_free_blocks == num_blocks
    steps = record_schedules(engine)
    add_all(engine)

    assert run_to_completion(engine) == solo_completions
    assert engine.scheduler.num_preemptions > 0
    # Preempted sequences came back with their generated tokens and recomputed them (from the
    # end of whatever prefix blocks were still cached).
    recomputed = [
        seq
        for step in steps
        for seq in step
        if seq.num_output_tokens > 0 and seq.num_scheduled_tokens > 1
    ]
    assert recomputed
    assert_all_blocks_free(engine)


def test_requests_joining_a_running_batch_equal_their_solo_runs(
    llama_path, solo_completions, async_scheduling
):
    engine = make_engine(llama_path, async_scheduling=async_scheduling)
    steps = record_schedules(engine)
    request_ids = list(REQUESTS)
    add_all(engine, request_ids[:8])
    completions: dict[str, Completion] = {}
    for _ in range(3):
        collect(completions, engine.step())
    for request_id in request_ids[8:]:
        assert any(seq.num_output_tokens > 0 for seq in engine.scheduler.running)
        add_all(engine, [request_id])
        collect(completions, engine.step())
    assert run_to_completion(engine, completions) == solo_completions
    mixed_steps = [
        step
        for step in steps
        if any(seq.num_output_tokens == 0 for seq in step)
        and any(seq.num_output_tokens > 0 for seq in step)
    ]
    assert len(mixed_steps) >= len(request_ids) - 8
    assert_all_blocks_free(engine)


def test_max_num_seqs_and_max_num_batched_tokens_are_respected(
    llama_path, solo_completions, async_scheduling
):
    max_num_seqs, token_budget = 8, 24
    # Prompts longer than what a step has left are prefilled in chunks: outputs stay the same.
    engine = make_engine(
        llama_path,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=token_budget,
        async_scheduling=async_scheduling,
    )
    steps = record_schedules(engine)
    add_all(engine)
    token_limited_steps = 0
    completions: dict[str, Completion] = {}
    while engine.has_unfinished_requests():
        collect(completions, engine.step())
        step = steps[-1]
        assert len(step) <= max_num_seqs
        tokens = sum(seq.num_scheduled_tokens for seq in step)
        assert tokens <= token_budget
        if tokens == token_budget and len(step) < max_num_seqs:
            token_limited_steps += 1

    assert completions == solo_completions
    # Both limits were reached, prompts were chunked, and the cache never ran out.
    assert max(len(step) for step in steps) == max_num_seqs
    assert token_limited_steps > 0
    chunks = [
        s for step in steps for s in step if s.num_output_tokens == 0 and s.num_computed_tokens
    ]
    assert chunks, "no prompt was prefilled in chunks"
    assert engine.scheduler.num_preemptions == 0


def test_aborting_requests_frees_their_blocks(llama_path, solo_completions, async_scheduling):
    engine = make_engine(llama_path, max_num_seqs=4, async_scheduling=async_scheduling)
    request_ids = list(REQUESTS)[:6]
    add_all(engine, request_ids)
    completions: dict[str, Completion] = {}
    for _ in range(2):
        collect(completions, engine.step())
    manager = engine.scheduler.block_manager
    running = next(
        seq for seq in engine.scheduler.running if REQUESTS[seq.request_id][1].max_tokens > 2
    )
    waiting = engine.scheduler.waiting[0]
    blocks = list(running.block_table)
    assert blocks and all(manager.blocks[block].ref_count == 1 for block in blocks)
    free_before = manager.num_free_blocks

    assert engine.abort_request(running.request_id)
    assert manager.num_free_blocks == free_before + len(blocks)
    assert all(manager.blocks[block].ref_count == 0 for block in blocks)
    assert engine.abort_request(waiting.request_id)
    assert not engine.abort_request(running.request_id)
    assert not engine.abort_request("never-submitted")

    run_to_completion(engine, completions)
    assert waiting.request_id not in completions
    aborted = completions.pop(running.request_id)
    assert aborted.finish_reason is None
    # Two steps ran before the abort; with asynchronous scheduling the second one's tokens were
    # still on their way, and the abort drops them.
    tokens_seen = 1 if async_scheduling else 2
    assert aborted.token_ids == solo_completions[running.request_id].token_ids[:tokens_seen]
    assert completions == {
        request_id: solo_completions[request_id]
        for request_id in request_ids
        if request_id not in (running.request_id, waiting.request_id)
    }
    assert_all_blocks_free(engine)


def test_a_cached_prefix_is_reused_and_gives_the_same_output(llama_path, async_scheduling):
    # Two full 16-token blocks of shared prefix, then different tails.
    prefix, first_tail, second_tail = random_prompts([32, 8, 5], seed=99)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fresh = make_engine(llama_path)
    expected = {
        name: generate_alone(fresh, prefix + tail, params)
        for name, tail in (("first", first_tail), ("second", second_tail))
    }

    engine = make_engine(llama_path, async_scheduling=async_scheduling)
    steps = record_schedules(engine)
    engine.add_request("first", prefix + first_tail, params)
    completions: dict[str, Completion] = {}
    # A prompt's blocks are found by their prefix once its step is resolved: with asynchronous
    # scheduling, one step later.
    for _ in range(1 + async_scheduling):
        collect(completions, engine.step())
    # The second request arrives after the first's prompt is in the cache.
    engine.add_request("second", prefix + second_tail, params)
    collect(completions, engine.step())
    first, second = (engine.sequences[name] for name in ("first", "second"))
    assert second.block_table[:2] == first.block_table[:2]
    manager = engine.scheduler.block_manager
    assert [manager.blocks[block].ref_count for block in first.block_table[:2]] == [2, 2]
    assert [seq.num_computed_tokens for seq in steps[-1] if seq.request_id == "second"] == [32]
    assert run_to_completion(engine, completions) == expected

    # Finished, its blocks are free but still cached: the same prompt again computes only the
    # tokens after them.
    assert generate_alone(engine, prefix + first_tail, params) == expected["first"]
    scheduled = [step for step in steps if step]  # the last call may only resolve
    assert scheduled[-len(expected["first"].token_ids)][0].num_computed_tokens == 32
    assert_all_blocks_free(engine)

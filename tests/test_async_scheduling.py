"""Asynchronous scheduling (EngineConfig.async_scheduling): a step is launched before the tokens
of the one before are read on the host, its decode inputs taken on the device; what any request
generates stays what it generates with each step resolved at once."""

from __future__ import annotations

import pytest
from helpers import (
    assert_all_blocks_free,
    make_engine,
    random_prompts,
    run_to_completion,
)

from warmserve.config import SamplingParams
from warmserve.engine import model_runner
from warmserve.engine.sequence import PLACEHOLDER

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def both_ways(path, requests, **engine_config):
    """Runs `requests` ({id: (prompt, params)}) to completion with each step resolved at once
    and with asynchronous scheduling; returns both engines' completions."""
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(path, async_scheduling=async_scheduling, **engine_config)
        for request_id, (prompt, params) in requests.items():
            engine.add_request(request_id, prompt, params)
        results.append(run_to_completion(engine))
        assert_all_blocks_free(engine)
    return results


def test_a_step_is_launched_before_the_one_before_is_read(llama_path, monkeypatch):
    fills = []
    real_fill = model_runner.fill_placeholders

    def counting_fill(input_ids, fill, previous):
        fills.append(None if fill is None else fill.shape[1])
        real_fill(input_ids, fill, previous)

    monkeypatch.setattr(model_runner, "fill_placeholders", counting_fill)
    engine = make_engine(llama_path, async_scheduling=True)
    prompts = random_prompts([5, 9, 14], seed=11)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, GREEDY)

    # The first call launches the prefill and reads nothing yet.
    assert engine.step() == []
    assert engine.in_flight is not None
    assert all(seq.token_ids[-1] == PLACEHOLDER for seq in engine.scheduler.running)
    # The second launches the first decode, its inputs the prefill's tokens on the device,
    # then reads the prefill's tokens.
    first_tokens = engine.step()
    assert sorted(output.request_id for output in first_tokens) == ["0", "1", "2"]
    assert fills == [None, 3]
    assert engine.in_flight is not None

    completions = run_to_completion(engine)
    reference = make_engine(llama_path)
    for index, prompt in enumerate(prompts):
        reference.add_request(str(index), prompt, GREEDY)
    expected = run_to_completion(reference)
    for request_id, completion in completions.items():
        first = next(o.token_id for o in first_tokens if o.request_id == request_id)
        assert [first, *completion.token_ids] == expected[request_id].token_ids
    assert engine.in_flight is None
    assert_all_blocks_free(engine)


def test_stop_tokens_eos_and_lengths_end_requests_as_without_it(llama_path):
    """Every other request stops at a token its greedy continuation reaches (the step after it
    was launched already); the others end at max_tokens or at the context's end."""
    prompts = random_prompts([3 + index for index in range(16)], seed=21)
    probe = make_engine(llama_path, max_model_len=24)
    for index, prompt in enumerate(prompts):
        probe.add_request(str(index), prompt, SamplingParams(max_tokens=8, temperature=0.0))
    continuations = run_to_completion(probe)
    requests = {}
    for index, prompt in enumerate(prompts):
        continuation = continuations[str(index)].token_ids
        stop = (continuation[min(2, len(continuation) - 1)],) if index % 2 else ()
        params = SamplingParams(
            max_tokens=1 + index % 7, temperature=0.0, stop_token_ids=stop, ignore_eos=True
        )
        requests[str(index)] = (prompt, params)
    synchronous, overlapped = both_ways(llama_path, requests, max_model_len=24)
    assert overlapped == synchronous
    reasons = {completion.finish_reason for completion in synchronous.values()}
    assert reasons == {"stop", "length"}


def test_seeded_sampling_draws_the_same_tokens(llama_path):
    prompts = random_prompts([4, 8, 12, 16], seed=5)
    requests = {
        str(index): (prompt, SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=index))
        for index, prompt in enumerate(prompts)
    }
    synchronous, overlapped = both_ways(llama_path, requests)
    assert overlapped == synchronous


def test_a_request_that_needs_its_tokens_on_the_host_waits_for_the_step_before(llama_path):
    """A penalized request's steps read the tokens before them: while it runs, every step is
    resolved at once; the others overlap again once it has finished."""
    engine = make_engine(llama_path, async_scheduling=True)
    prompts = random_prompts([6, 10], seed=8)
    engine.add_request("plain", prompts[0], SamplingParams(max_tokens=20, temperature=0.0))
    penalized = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3)
    engine.add_request("penalized", prompts[1], penalized)
    in_flight = []
    completions = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            completions.setdefault(output.request_id, []).append(output.token_id)
        in_flight.append(engine.in_flight is not None)
    assert not any(in_flight[:4]) and all(in_flight[5:-1])

    reference = make_engine(llama_path)
    reference.add_request("plain", prompts[0], SamplingParams(max_tokens=20, temperature=0.0))
    reference.add_request("penalized", prompts[1], penalized)
    expected = run_to_completion(reference)
    assert completions == {key: value.token_ids for key, value in expected.items()}


@pytest.mark.parametrize("num_blocks", [6, 9])
def test_preemption_while_a_step_is_in_flight_changes_no_output(llama_path, num_blocks):
    """A preempted sequence was in the step in flight; its token still arrives, and one whose
    last token that was finishes from the waiting queue."""
    block_size = 4
    probe = make_engine(llama_path, block_size=block_size)
    prompts = random_prompts([5, 7, 9, 11, 6, 8], seed=17)
    requests = {
        str(index): (prompt, SamplingParams(max_tokens=3 + 2 * index, temperature=0.0))
        for index, prompt in enumerate(prompts)
    }
    synchronous, overlapped = both_ways(
        llama_path,
        requests,
        block_size=block_size,
        kv_cache_bytes=num_blocks * probe.kv_region.block_bytes,
    )
    assert overlapped == synchronous


def test_asynchronous_scheduling_is_on_by_default_only_where_a_step_can_overlap(llama_path):
    # On a CPU launching a step computes it: nothing would overlap the host's next step.
    assert make_engine(llama_path).async_scheduling is False
    assert make_engine(llama_path, async_scheduling=True).async_scheduling is True

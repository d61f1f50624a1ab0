"""How many prompt tokens a step that decodes carries (engine/prompt_budget.py): at least the
configured budget, more while such a step stays within a ratio of the decode step's time, from
the model's own synchronous steps."""

from __future__ import annotations

import pytest
from helpers import run_to_completion

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.prompt_budget import PromptBudget

MS = 1e-3


def timed(budget: PromptBudget, decode_ms: float, token_ms: float, prompt_tokens: int = 512):
    """Steady steps: decodes alone, and decodes beside `prompt_tokens` prompt tokens."""
    for _ in range(50):
        budget.observe(decode_ms * MS, 0, 64)
        budget.observe((decode_ms + token_ms * prompt_tokens) * MS, prompt_tokens, 63)


def test_the_configured_budget_holds_until_both_times_are_known():
    budget = PromptBudget(512, 4096, 2.5)
    assert budget.tokens == 512
    budget.observe(3 * MS, 0, 64)
    assert budget.tokens == 512  # a decode step's time, no prompt token's yet
    budget.observe(30 * MS, 512, 0)
    assert budget.tokens == 512  # a step without decodes says nothing about the streams


def test_a_small_model_carries_more_prompt_tokens_a_large_one_the_configured_budget():
    # The H200 figures at 64 clients: a 0.6B shape's decode step 2.92 ms, its 512-token prompt
    # step 5.58 ms; an 8B shape's 6.88 and 18.92 ms.
    small = PromptBudget(512, 4096, 2.5)
    timed(small, 2.92, (5.58 - 2.92) / 512)
    assert small.tokens == 832  # (2.5 - 1) * 2.92 / 0.0052 = 842, down to whole blocks
    large = PromptBudget(512, 4096, 2.5)
    timed(large, 6.88, (18.92 - 6.88) / 512)
    assert large.tokens == 512  # 429 tokens would fit: never below the configured budget


def test_the_budget_follows_the_step_times_within_its_bounds():
    budget = PromptBudget(64, 1024, 3)
    timed(budget, 5, 0.01)
    assert budget.tokens == 992  # (3 - 1) * 5 / 0.01 = 1000, down to whole blocks
    timed(budget, 5, 0.001)  # prompt tokens got cheaper: the ceiling
    assert budget.tokens == 1024
    timed(budget, 5, 0.1)  # dearer: the floor
    assert budget.tokens == 96
    budget.observe(5 * MS, 8, 63)  # too few prompt tokens to time them by: no change
    assert budget.tokens == 96


def test_a_ratio_of_zero_keeps_the_configured_budget():
    budget = PromptBudget(512, 4096, 0)
    timed(budget, 2.92, 0.001)
    assert budget.tokens == 512


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("ratio", [0, 1000])
def test_an_engine_sets_its_schedulers_budget_from_its_own_steps(
    checkpoint_factory, ratio, async_scheduling
):
    config = EngineConfig(
        max_num_batched_tokens=128,
        prefill_tokens_beside_decodes=16,
        prompt_step_time_ratio=ratio,
        async_scheduling=async_scheduling,
    )
    engine = engine_from_checkpoint(
        checkpoint_factory("llama"), dtype="float32", engine_config=config, max_model_len=256
    )
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request("stream", [5, 6, 7], params)
    for _ in range(4):
        engine.step()  # the stream decodes alone
    for index in range(3):  # prompts beside its decodes
        engine.add_request(f"prompt{index}", list(range(10, 90)), params)
    run_to_completion(engine)
    if ratio:  # a tiny model's prompt tokens cost next to nothing beside its decode step
        assert engine.scheduler.prompt_budget > 16
    else:
        assert engine.scheduler.prompt_budget == 16
    engine.close()

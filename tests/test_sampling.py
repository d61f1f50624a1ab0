"""Sampling: the sampler on hand-made logits, and seeded sampling through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import generate_alone, make_engine, random_prompts, run_to_completion

from warmserve.config import SamplingParams
from warmserve.layers.sampling import sample

# Probabilities 0.5, 0.25, 0.15, 0.1.
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])
LOGITS = PROBS.log()
DRAWS = 8_000


def draw_frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = logits.expand(DRAWS, -1).contiguous()
    tokens = sample(rows, [params] * DRAWS, [generator] * DRAWS)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / DRAWS


def assert_frequencies_match(frequencies: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 5 standard deviations of a binomial count, and exactly 0 where expected is 0."""
    expected = expected.double() / expected.sum()
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert torch.all((frequencies - expected).abs() <= 5 * sigma + 1e-12), (frequencies, expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), PROBS),
        # Temperature 0.5 squares the probabilities.
        (SamplingParams(temperature=0.5), PROBS**2),
        (SamplingParams(temperature=2.0), PROBS.sqrt()),
        (SamplingParams(top_k=2), torch.tensor([0.5, 0.25, 0.0, 0.0])),
        # The smallest set of most likely tokens whose mass reaches top_p.
        (SamplingParams(top_p=0.7), torch.tensor([0.5, 0.25, 0.0, 0.0])),
        (SamplingParams(top_p=0.8), torch.tensor([0.5, 0.25, 0.15, 0.0])),
        (SamplingParams(top_p=0.4), torch.tensor([1.0, 0.0, 0.0, 0.0])),
        (SamplingParams(top_k=3, top_p=0.6), torch.tensor([0.5, 0.25, 0.0, 0.0])),
    ],
    ids=[
        "plain",
        "temperature-0.5",
        "temperature-2",
        "top-k",
        "top-p-0.7",
        "top-p-0.8",
        "top-p-0.4",
        "top-k-and-top-p",
    ],
)
def test_sampled_distribution(params, expected):
    assert_frequencies_match(draw_frequencies(params), expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, temperature=5.0),
        SamplingParams(top_p=1e-6),
    ],
    ids=["temperature-0", "top-k-1", "top-k-1-hot", "tiny-top-p"],
)
def test_greedy_settings_pick_the_argmax(params):
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(row) for row in range(64)]
    tokens = sample(logits, [params] * 64, generators)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.9, 1.2]])
    params = SamplingParams(top_k=3, temperature=1.0)
    frequencies = draw_frequencies(params, logits[0])
    assert set(frequencies.nonzero().flatten().tolist()) == {1, 3, 5}


def test_each_row_samples_as_it_would_alone():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(seed=row, top_k=20) if row % 2 else SamplingParams() for row in range(6)
    ]

    def generators():
        return [torch.Generator().manual_seed(row) for row in range(6)]

    batched_generators, alone_generators = generators(), generators()
    for _ in range(20):
        batched = sample(logits, params, batched_generators)
        for row in range(6):
            alone = sample(logits[row : row + 1], [params[row]], [alone_generators[row]])
            assert batched[row] == alone[0]


SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def sampling_engine(llama_path):
    return make_engine(llama_path)


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([12], seed=5)[0]


def test_the_same_seed_gives_the_same_tokens(sampling_engine, prompt):
    params = SamplingParams(seed=1, **SAMPLED)
    first = generate_alone(sampling_engine, prompt, params)
    second = generate_alone(sampling_engine, prompt, params)
    assert first == second
    assert len(first.token_ids) == SAMPLED["max_tokens"]


def test_different_seeds_give_different_tokens(sampling_engine, prompt):
    # The tiny model's next-token distributions are broad (top logits about 1 apart): 24 tokens
    # drawn with two seeds agree everywhere only with negligible probability.
    outputs = {
        tuple(
            generate_alone(sampling_engine, prompt, SamplingParams(seed=seed, **SAMPLED)).token_ids
        )
        for seed in range(4)
    }
    assert len(outputs) == 4


def test_greedy_settings_agree_through_the_engine(sampling_engine, prompt):
    common = dict(max_tokens=24, ignore_eos=True)
    greedy = generate_alone(sampling_engine, prompt, SamplingParams(temperature=0.0, **common))
    for params in (
        SamplingParams(top_k=1, seed=7, **common),
        SamplingParams(top_p=1e-6, seed=7, **common),
        SamplingParams(top_p=1e-6, **common),
    ):
        assert generate_alone(sampling_engine, prompt, params) == greedy
    sampled = generate_alone(sampling_engine, prompt, SamplingParams(seed=7, **SAMPLED))
    assert sampled.token_ids != greedy.token_ids


def test_a_seeded_request_gives_the_same_tokens_alone_and_batched(llama_path, prompt):
    params = SamplingParams(seed=11, **SAMPLED)
    alone = generate_alone(make_engine(llama_path), prompt, params)

    # Batched with seeded, unseeded and greedy requests, in a cache small enough that
    # sequences are preempted and recomputed.
    engine = make_engine(llama_path, block_size=4, kv_cache_bytes=_bytes_for_blocks(llama_path, 40))
    others = random_prompts([3, 30, 17, 9, 25, 1], seed=6)
    for index, other in enumerate(others):
        other_params = [
            SamplingParams(seed=index, **SAMPLED),
            SamplingParams(**SAMPLED),
            SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        ][index % 3]
        engine.add_request(f"other-{index}", other, other_params)
        if index == 2:
            engine.add_request("seeded", prompt, params)
    completions = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    assert completions["seeded"] == alone


def _bytes_for_blocks(path, num_blocks: int, block_size: int = 4) -> int:
    probe = make_engine(path, block_size=block_size)
    return num_blocks * probe.kv_region.block_bytes


def test_sampling_parameters_are_validated():
    for bad in (
        dict(temperature=-0.1),
        dict(temperature=math.nan),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)

"""Logits processors and the sampling distribution equal transformers' processors on the same
logits; the engine's greedy output with them equals transformers' generate on the same checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from helpers import generate_alone, make_engine, random_prompts
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from warmserve.config import SamplingParams
from warmserve.engine.engine import RequestRejected
from warmserve.layers.logits_processors import process_logits
from warmserve.layers.sampling import sampling_probs, token_logprobs

VOCAB = 64
PROMPT_LEN = 7


def batch(rows: int, seed: int = 0, generated: int = 5):
    """Random logits and token histories (a prompt of PROMPT_LEN, then `generated` tokens)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * 3
    token_ids = torch.randint(0, VOCAB // 4, (rows, PROMPT_LEN + generated), generator=generator)
    return logits, token_ids


def process(logits, params, token_ids, eos=frozenset()):
    return process_logits(
        logits, params, token_ids.tolist(), [PROMPT_LEN] * len(params), frozenset(eos)
    )


def test_nothing_asked_is_no_work():
    logits, token_ids = batch(3)
    assert process(logits, [SamplingParams()] * 3, token_ids) is logits


def test_repetition_penalty_equals_transformers():
    logits, token_ids = batch(4)
    penalties = [1.3, 1.0, 0.7, 2.0]
    params = [SamplingParams(repetition_penalty=value) for value in penalties]
    processed = process(logits, params, token_ids)
    for row, value in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(value)(
            token_ids[row : row + 1], logits[row : row + 1].clone()
        )
        torch.testing.assert_close(processed[row : row + 1], expected, rtol=0, atol=0)


def test_frequency_and_presence_penalties_follow_openai():
    logits, token_ids = batch(3)
    settings = [(0.5, 0.0), (0.0, -1.5), (2.0, 1.0)]
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in settings]
    processed = process(logits, params, token_ids)
    for row, (frequency, presence) in enumerate(settings):
        expected = logits[row].clone()
        # Only the output counts, not the prompt (OpenAI, vLLM).
        output = token_ids[row, PROMPT_LEN:].tolist()
        for token in set(output):
            expected[token] -= frequency * output.count(token) + presence
        torch.testing.assert_close(processed[row], expected)


def test_logit_bias_equals_transformers_sequence_bias():
    logits, token_ids = batch(2)
    bias = ((3, 5.0), (10, -100.0), (63, 0.25))
    params = [SamplingParams(logit_bias=bias), SamplingParams()]
    processed = process(logits, params, token_ids)
    expected = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias])(
        token_ids[:1], logits[:1].clone()
    )
    torch.testing.assert_close(processed[:1], expected, rtol=0, atol=0)
    assert torch.equal(processed[1], logits[1])


@pytest.mark.parametrize("generated", [0, 2, 3])
def test_min_tokens_equals_transformers(generated):
    logits, token_ids = batch(3, generated=generated)
    eos = {1, 2}
    params = [
        SamplingParams(min_tokens=3, stop_token_ids=(7,)),
        # EOS does not end a request that ignores it, so it is not masked.
        SamplingParams(min_tokens=3, stop_token_ids=(9,), ignore_eos=True),
        SamplingParams(),
    ]
    processed = process(logits, params, token_ids, eos)
    for row, stops in enumerate([[1, 2, 7], [9], []]):
        expected = logits[row : row + 1].clone()
        if stops:
            expected = MinNewTokensLengthLogitsProcessor(PROMPT_LEN, 3, stops)(
                token_ids[row : row + 1], expected
            )
        torch.testing.assert_close(processed[row : row + 1], expected, rtol=0, atol=0)


def test_all_processors_together_equal_transformers_chain():
    logits, token_ids = batch(2, generated=1)
    params = SamplingParams(
        logit_bias=((5, 3.0),), repetition_penalty=1.5, min_tokens=2, stop_token_ids=(4,)
    )
    processed = process(logits, [params, SamplingParams()], token_ids, {0})
    expected = logits[:1].clone()
    for processor in (
        SequenceBiasLogitsProcessor([[[5], 3.0]]),
        RepetitionPenaltyLogitsProcessor(1.5),
        MinNewTokensLengthLogitsProcessor(PROMPT_LEN, 2, [0, 4]),
    ):
        expected = processor(token_ids[:1], expected)
    torch.testing.assert_close(processed[:1], expected)
    assert torch.equal(processed[1], logits[1])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(min_p=0.1),
        SamplingParams(min_p=0.3, temperature=0.7),
        SamplingParams(min_p=0.05, top_k=20, top_p=0.9, temperature=1.3),
        SamplingParams(top_k=10, temperature=0.5),
        SamplingParams(top_p=0.8),
    ],
    ids=["min-p", "min-p-temperature", "all", "top-k", "top-p"],
)
def test_sampling_distribution_equals_transformers_warpers(params):
    logits, token_ids = batch(8, seed=3)
    scores = logits.clone()
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(token_ids, scores)
    torch.testing.assert_close(sampling_probs(logits, [params] * 8), scores.softmax(dim=-1))


def test_token_logprobs_are_the_log_softmax():
    logits, _ = batch(3)
    tokens = torch.tensor([0, 5, 63])
    chosen, top_ids, top_values = token_logprobs(logits, tokens, 4)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(chosen, expected[torch.arange(3), tokens])
    torch.testing.assert_close(top_values, expected.sort(dim=-1, descending=True).values[:, :4])
    torch.testing.assert_close(expected.gather(1, top_ids), top_values)


# ---- through the engine, against transformers' generate on the same checkpoint ------------

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engine(llama_path):
    return make_engine(llama_path)


@pytest.fixture(scope="module")
def reference(llama_path):
    return AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()


def transformers_greedy(model, prompt, **options) -> list[int]:
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            **options,
        )
    return output[0, len(prompt) :].tolist()


def test_repetition_penalty_and_bias_through_the_engine(engine, reference):
    prompt = random_prompts([9], seed=4)[0]
    favoured = prompt[0]
    common = dict(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    # The bias alone makes the favoured token repeat; the penalty (the token is in the prompt,
    # then in the output) holds it back.
    biased = SamplingParams(logit_bias=((favoured, 4.0),), **common)
    penalized = SamplingParams(logit_bias=((favoured, 4.0),), repetition_penalty=1.8, **common)
    expected = transformers_greedy(
        reference,
        prompt,
        repetition_penalty=1.8,
        sequence_bias={(favoured,): 4.0},
        eos_token_id=None,
    )
    assert generate_alone(engine, prompt, penalized).token_ids == expected
    assert generate_alone(engine, prompt, biased).token_ids == [favoured] * NEW_TOKENS
    plain = generate_alone(engine, prompt, SamplingParams(**common))
    assert expected not in (plain.token_ids, [favoured] * NEW_TOKENS)


def test_min_tokens_holds_eos_back_as_transformers_does(engine, reference):
    prompt = random_prompts([6], seed=8)[0]
    eos = next(iter(engine.scheduler.eos_token_ids))
    # A large bias makes EOS the greedy choice; min_tokens holds it back for 5 tokens.
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, min_tokens=5, logit_bias=((eos, 50.0),)
    )
    completion = generate_alone(engine, prompt, params)
    expected = transformers_greedy(
        reference, prompt, min_new_tokens=5, sequence_bias={(eos,): 50.0}, eos_token_id=eos
    )
    assert completion.token_ids == expected
    assert len(completion.token_ids) == 6 and completion.token_ids[-1] == eos
    assert completion.finish_reason == "stop"


def test_logprobs_through_the_engine(engine):
    prompt = random_prompts([5], seed=2)[0]
    engine.add_request("lp", prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    engine.add_request("plain", prompt, SamplingParams(max_tokens=3, temperature=0.0))
    outputs = engine.step()
    by_id = {output.request_id: output for output in outputs}
    assert by_id["plain"].logprobs is None
    logprobs = by_id["lp"].logprobs
    assert len(logprobs.top_token_ids) == 2 == len(logprobs.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert logprobs.top_token_ids[0] == by_id["lp"].token_id
    assert logprobs.logprob == logprobs.top_logprobs[0] < 0
    assert logprobs.top_logprobs[1] <= logprobs.top_logprobs[0]
    engine.abort_request("lp")
    engine.abort_request("plain")


def test_prompt_logprobs_through_the_engine_equal_transformers(engine, reference):
    # Longer than one piece of scored rows (64), and run twice: the second run would find the
    # prompt in the prefix cache, which a scored prompt does not use.
    other, prompt = random_prompts([20, 70], seed=6)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    expected = torch.log_softmax(logits[:-1], dim=-1)
    for _ in range(2):
        engine.add_request("other", other, SamplingParams(max_tokens=1, prompt_logprobs=1))
        engine.add_request("scored", prompt, SamplingParams(max_tokens=1, prompt_logprobs=3))
        engine.add_request("plain", prompt, SamplingParams(max_tokens=1))
        outputs = {output.request_id: output for output in engine.step()}
        assert outputs["plain"].prompt_logprobs is None
        assert len(outputs["other"].prompt_logprobs) == len(other) - 1
        scored = outputs["scored"].prompt_logprobs
        assert len(scored) == len(prompt) - 1
        for position, entry in enumerate(scored):
            row = expected[position]
            assert entry.logprob == pytest.approx(row[prompt[position + 1]].item(), abs=5e-5)
            assert entry.top_token_ids == row.topk(3).indices.tolist()
            torch.testing.assert_close(
                torch.tensor(entry.top_logprobs), row.topk(3).values, atol=5e-5, rtol=0
            )


def test_the_engine_refuses_what_the_vocabulary_cannot_hold(engine):
    vocab = engine.vocab_size
    with pytest.raises(RequestRejected, match="logit_bias"):
        engine.add_request("bias", [5], SamplingParams(logit_bias=((vocab, 1.0),)))
    assert not engine.has_unfinished_requests()

"""What the engine accepts, and how a request ends: EOS, stop tokens, max_tokens, context."""

from __future__ import annotations

import pytest
from helpers import generate_alone, make_engine, random_prompts, run_to_completion

from warmserve.config import SamplingParams
from warmserve.engine.engine import RequestRejected

# The fixture checkpoints end generation at <|im_end|> (config.json and generation_config.json)
# and at <|endoftext|> (generation_config.json only).
IM_END, ENDOFTEXT = 2, 0


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(llama_path, request):
    return make_engine(llama_path, max_model_len=64, async_scheduling=request.param)


@pytest.fixture(scope="module")
def eos_prompt(engine) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation reaches an EOS token, and that continuation."""
    prompts = random_prompts([5 + index for index in range(24)], seed=3)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    for index, completion in sorted(run_to_completion(engine).items(), key=lambda kv: int(kv[0])):
        tokens = completion.token_ids
        if {IM_END, ENDOFTEXT} & set(tokens[1:]):
            return prompts[int(index)], tokens
    raise AssertionError("no greedy continuation reaches EOS; pick other prompts")


def test_the_engine_reads_every_eos_id_of_the_checkpoint(engine):
    assert engine.scheduler.eos_token_ids == {IM_END, ENDOFTEXT}


def test_eos_ends_a_request_unless_ignored(engine, eos_prompt):
    prompt, continuation = eos_prompt
    first_eos = next(i for i, token in enumerate(continuation) if token in (IM_END, ENDOFTEXT))
    # With ignore_eos (the fixture's run), generation went on past it.
    assert len(continuation) > first_eos + 1
    params = SamplingParams(max_tokens=40, temperature=0.0)

    stopped = generate_alone(engine, prompt, params)
    assert stopped.token_ids == continuation[: first_eos + 1]
    assert stopped.finish_reason == "stop"


def test_a_stop_token_ends_a_request(engine, eos_prompt):
    prompt, continuation = eos_prompt
    stop_token = continuation[0]
    params = SamplingParams(
        max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_token,)
    )
    completion = generate_alone(engine, prompt, params)
    assert completion.token_ids == [stop_token]
    assert completion.finish_reason == "stop"


def test_the_context_length_ends_a_request_before_max_tokens(engine):
    prompt = random_prompts([60], seed=4)[0]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    completion = generate_alone(engine, prompt, params)
    assert len(completion.token_ids) == engine.max_model_len - len(prompt)
    assert completion.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty"),
        (list(range(3, 67)), "64 tokens"),
        ([5, 512], "token ids must lie in"),
        ([5, -1], "token ids must lie in"),
    ],
    ids=["empty", "too-long", "past-vocab", "negative"],
)
def test_requests_the_model_cannot_take_are_rejected(engine, prompt, message):
    with pytest.raises(RequestRejected, match=message):
        engine.add_request("rejected", prompt, SamplingParams())
    assert not engine.has_unfinished_requests()


def test_a_request_id_in_use_is_rejected(engine):
    engine.add_request("twice", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(RequestRejected, match="already running"):
        engine.add_request("twice", [7], SamplingParams())
    run_to_completion(engine)
    # Finished, the id can be used again.
    engine.add_request("twice", [7], SamplingParams(max_tokens=1))
    assert run_to_completion(engine)["twice"].finish_reason == "length"

"""Several choices (n, a list of prompts), echo and the new sampling fields at the HTTP layer,
over the in-memory controller."""

from __future__ import annotations

import pytest
from test_api_unit import MODEL, assert_error, sse_payloads

from warmserve.api.choices import sample_params
from warmserve.api.openai_schemas import SEED_MAX, SEED_MIN
from warmserve.config import SamplingParams


def test_choices_are_prompt_major_with_derived_seeds_and_summed_usage(client, controller):
    body = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a b", [7]], "n": 2, "seed": 5, "max_tokens": 3},
    ).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert [(prompt, params.seed) for prompt, params in controller.requests] == [
        ("a b", 5),
        ("a b", 6),
        ([7], 5),
        ([7], 6),
    ]
    # Each prompt counted once (2 + 1 tokens), every choice's tokens summed.
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_unseeded_samples_share_parameters_and_seeds_wrap_around():
    params = SamplingParams(temperature=0.7)
    assert sample_params(params, 3) == [params] * 3
    seeds = [p.seed for p in sample_params(SamplingParams(seed=SEED_MAX - 1), 3)]
    assert seeds == [SEED_MAX - 1, SEED_MAX, SEED_MIN]


def test_streamed_chat_choices_each_carry_their_index(client):
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "n": 3,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = sse_payloads(response.text)
    by_index: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == " w0 w1"
        assert [c["finish_reason"] for c in choices][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_echo_prepends_the_prompt_text(client):
    body = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a b", [4, 5]], "echo": True, "max_tokens": 1},
    ).json()
    assert [choice["text"] for choice in body["choices"]] == ["a b w0", "t4 t5 w0"]
    response = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "a b", "echo": True, "max_tokens": 2, "stream": True},
    )
    texts = [chunk["choices"][0]["text"] for chunk in sse_payloads(response.text)]
    assert texts == ["a b w0", " w1"]


def test_one_refused_choice_refuses_the_request_and_ends_the_others(client, controller):
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [500]], "max_tokens": 50}
    )
    assert_error(response, 400, "invalid_request")
    assert controller.model(MODEL).requests_in_flight == 0


def test_sampling_fields_reach_the_engine_parameters(client, controller):
    client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "min_p": 0.1,
            "min_tokens": 2,
            "logit_bias": {"7": 3, "9": -100},
            "logprobs": True,
            "top_logprobs": 3,
            "user": "someone",
        },
    ).raise_for_status()
    params = controller.last_params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.repetition_penalty, params.min_p, params.min_tokens) == (1.2, 0.1, 2)
    assert params.logit_bias == ((7, 3.0), (9, -100.0))
    assert params.logprobs == 3


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"prompt_logprobs": 1}, "prompt_logprobs is not supported"),
        ({"temprature": 0.5}, "temprature: unrecognized"),
        ({"echo": True}, "echo is not supported"),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_field(client, body, fragment):
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body},
    )
    assert fragment in assert_error(response, 400, "invalid_request")["message"]


def test_each_choice_parses_its_own_tool_calls(client, controller):
    controller.reply_pieces = [
        "<tool_call>",
        '{"name": "get_time", "arguments": {}}',
        "</tool_call>",
    ]
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    messages = [{"role": "user", "content": "x"}]
    body = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "tools": tools, "n": 2},
    ).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "tools": tools, "n": 2, "stream": True},
    )
    finishes = {
        choice["index"]: choice["finish_reason"]
        for chunk in sse_payloads(response.text)
        for choice in chunk["choices"]
        if choice["finish_reason"]
    }
    assert finishes == {0: "tool_calls", 1: "tool_calls"}

"""The OpenAI routes of a real server, through the official openai client."""

from __future__ import annotations

import time

import pytest
from server_process import REGISTERED_MODEL, SHARED_MODEL
from streams import hang_up_after_first_event
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over"


def test_models_list_shows_the_loaded_model(server, shared_model):
    models = server.openai().models.list()
    card = next(model for model in models.data if model.id == shared_model)
    assert card.object == "model"
    assert card.owned_by == "warmserve"
    assert card.model_extra["state"] == "loaded"


def test_registered_model_is_listed_and_loads_on_demand(server, shared_model):
    client = server.openai()
    listed = {model.id: model for model in client.models.list().data}
    assert listed[REGISTERED_MODEL].model_extra["state"] in ("disk", "host-cache")
    completion = client.completions.create(model=REGISTERED_MODEL, prompt="Hi", max_tokens=3)
    assert completion.model == REGISTERED_MODEL
    assert completion.usage.completion_tokens >= 1
    # keep_alive 0: unloaded again once idle, back to a registered entry in the host cache.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = {model.id: model for model in client.models.list().data}
        if listed[REGISTERED_MODEL].model_extra["state"] == "host-cache":
            return
        time.sleep(0.05)
    pytest.fail("the keep_alive 0 model stayed loaded")


def test_completion_with_a_text_prompt(server, shared_model):
    completion = server.openai().completions.create(
        model=shared_model, prompt=PROMPT, max_tokens=5, temperature=0
    )
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_tokens_equal_transformers(server, shared_model):
    """Token-id prompt, greedy, float32: the server's text is what transformers generates."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = server.model_root / SHARED_MODEL
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompt_ids = tokenizer.encode(PROMPT).ids
    max_tokens = 16

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    reference_ids = output[0, len(prompt_ids) :].tolist()

    completion = server.openai().completions.create(
        model=shared_model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0
    )
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.choices[0].text == tokenizer.decode(reference_ids, skip_special_tokens=True)
    expected_finish = "length" if len(reference_ids) == max_tokens else "stop"
    assert completion.choices[0].finish_reason == expected_finish


def test_chat_and_streaming_chat_agree(server, shared_model):
    client = server.openai()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    whole = client.chat.completions.create(
        model=shared_model, messages=messages, max_tokens=8, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1

    chunks = list(
        client.chat.completions.create(
            model=shared_model,
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == whole.choices[0].message.content
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish_reasons[-1] == whole.choices[0].finish_reason
    assert all(reason is None for reason in finish_reasons[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_streamed_completion_and_seeded_sampling(server, shared_model):
    client = server.openai()
    stream = client.completions.create(
        model=shared_model, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream)
    again = client.completions.create(
        model=shared_model, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3
    )
    assert streamed == again.choices[0].text


def test_client_hang_up_ends_the_generation(server, shared_model):
    max_tokens = 480  # about half a second of generation for the tiny model on CPU
    generated = ("warmserve_generation_tokens_total", (("model", shared_model),))
    before = server.metric_samples().get(generated, 0)
    with server.http() as http:
        body = {
            "model": shared_model,
            "prompt": "Hi",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        in_flight = hang_up_after_first_event(http, body, shared_model)
    assert in_flight == 0
    assert 1 <= server.metric_samples()[generated] - before < max_tokens

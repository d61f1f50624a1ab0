"""Text chunks encoded from a template carry the same JSON as the chunk models dumped whole."""

from __future__ import annotations

import json

import pytest

from warmserve.api.openai_responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
)
from warmserve.api.sse import TextChunkEvents, sse_event

TEXTS = ["", "Hello", ' "quoted" \\ back', "line\nbreak\ttab", "\u2028\u2029\x85", "é😀中", "\x00"]


def completion(model: str):
    return lambda index, text: Completion(
        id="cmpl-1", created=7, model=model, choices=[CompletionChoice(index=index, text=text)]
    )


def chat(index: int, text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[ChatChunkChoice(index=index, delta={"content": text})],
    )


def payload(event: str):
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = event[len("data: ") : -2]
    assert not set(body) & {"\n", "\r", "\x85", "\u2028", "\u2029"}  # one line for line readers
    return json.loads(body)


@pytest.mark.parametrize(
    "render",
    [completion("tiny"), completion(TextChunkEvents.PLACEHOLDER), chat],
    ids=["completion", "placeholder-as-model-name", "chat"],
)
def test_template_events_equal_the_models_events(render):
    events = TextChunkEvents(render)
    for index in (0, 3):
        for text in TEXTS:
            assert payload(events.event(index, text)) == payload(sse_event(render(index, text)))

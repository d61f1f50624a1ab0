"""LiteLLM's OpenAI-compatible provider against a real server (`model="openai/<name>"`)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def litellm(monkeypatch_module):
    # Otherwise its import fetches a price list from GitHub (retrying for seconds offline).
    monkeypatch_module.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return pytest.importorskip("litellm")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_completion_and_stream_through_litellm(litellm, server, shared_model):
    options = dict(
        model=f"openai/{shared_model}",
        api_base=f"{server.url}/v1",
        api_key=server.api_key,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
    )
    response = litellm.completion(**options)
    text = response.choices[0].message.content
    assert isinstance(text, str) and response.usage.completion_tokens >= 1
    assert response.choices[0].finish_reason in ("stop", "length")

    pieces = [
        chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **options)
    ]
    assert "".join(pieces) == text  # greedy: the same text streamed


def test_unknown_model_is_litellm_not_found(litellm, server):
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(
            model="openai/no-such-model",
            api_base=f"{server.url}/v1",
            api_key=server.api_key,
            messages=MESSAGES,
            max_tokens=2,
        )

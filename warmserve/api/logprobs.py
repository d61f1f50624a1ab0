"""Log-probabilities in OpenAI's two response shapes.

/v1/completions (the legacy shape): per choice `tokens`, `token_logprobs`, `top_logprobs` (one
dict per token: the sampled token and the `logprobs` most likely ones, as vLLM returns them) and
`text_offset` (where each token starts in the choice's text). /v1/chat/completions:
`content` = one `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}` per token.
Values are the log-softmax of the model's raw logits (see openai_schemas).
"""

from __future__ import annotations

from pydantic import BaseModel

from warmserve.controller.types import TokenLogprob

# JSON has no -inf; OpenAI and vLLM send this instead.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """`text_offset`: where the first of `tokens` starts in the choice's text."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.token)
    return CompletionLogprobs(
        tokens=[token.token for token in tokens],
        token_logprobs=[_finite(token.logprob) for token in tokens],
        top_logprobs=[
            {token.token: _finite(token.logprob)}
            | {text: _finite(value) for text, value in token.top}
            for token in tokens
        ],
        text_offset=offsets,
    )


def _top(text: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))


def chat_logprobs(tokens: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **_top(token.token, token.logprob).model_dump(),
                top_logprobs=[_top(text, value) for text, value in token.top],
            )
            for token in tokens
        ]
    )

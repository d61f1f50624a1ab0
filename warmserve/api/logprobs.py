"""Log-probabilities in OpenAI's two response shapes.

/v1/completions (the legacy shape): per choice `tokens`, `token_logprobs`, `top_logprobs` (one
dict per token: the sampled token and the `logprobs` most likely ones, as vLLM returns them) and
`text_offset` (where each token starts in the choice's text); with `echo`, the prompt's tokens
come first, the very first with null log-probabilities, as OpenAI sends them. /v1/chat/completions:
`content` = one `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}` per token.
Values are the log-softmax of the model's raw logits (see openai_schemas). With vLLM's
`return_tokens_as_token_ids`, tokens are written "token_id:{id}": a token that is part of a
character decodes alone to U+FFFD, the same text as many others.
"""

from __future__ import annotations

from pydantic import BaseModel

from warmserve.controller.engine_client import TokenLogprob

# JSON has no -inf; OpenAI and vLLM send this instead.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, LOGPROB_FLOOR)


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


def _name(token_id: int, text: str, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else text


def completion_logprobs(
    tokens: list[TokenLogprob], text_offset: int, as_ids: bool = False
) -> CompletionLogprobs:
    """`text_offset`: where the first of `tokens` starts in the choice's text."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.token)
    return CompletionLogprobs(
        tokens=[_name(token.token_id, token.token, as_ids) for token in tokens],
        token_logprobs=[_finite(token.logprob) for token in tokens],
        top_logprobs=[
            None
            if token.logprob is None  # a prompt's first token
            else {_name(token.token_id, token.token, as_ids): _finite(token.logprob)}
            | {_name(token_id, text, as_ids): _finite(value) for token_id, text, value in token.top}
            for token in tokens
        ],
        text_offset=offsets,
    )


def _top(token_id: int, text: str, logprob: float, as_ids: bool) -> TopLogprob:
    return TopLogprob(
        token=_name(token_id, text, as_ids),
        logprob=_finite(logprob),
        bytes=list(text.encode("utf-8")),
    )


def chat_logprobs(tokens: list[TokenLogprob], as_ids: bool = False) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **_top(token.token_id, token.token, token.logprob, as_ids).model_dump(),
                top_logprobs=[_top(*top, as_ids) for top in token.top],
            )
            for token in tokens
        ]
    )

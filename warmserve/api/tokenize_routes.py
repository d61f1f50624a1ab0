"""vLLM's /tokenize and /detokenize: a prompt (or a chat, rendered by the model's template) to
token ids, and token ids back to text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from warmserve.api import model_lookup
from warmserve.api.chat_template_options import ChatTemplateOptions
from warmserve.api.errors import APIError
from warmserve.api.openai_schemas import TOKEN_ID_MAX, ChatMessage, Text
from warmserve.api.services import Services

TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]


class TokenizeRequest(ChatTemplateOptions):
    """Either {"prompt"} (special tokens added, as for a completion) or {"messages"} (rendered
    by the chat template, encoded without added special tokens, as for a chat completion)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt", "give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize_router(services: Services, only_model: str | None) -> APIRouter:
    router = APIRouter()
    controller = services.controller

    @router.post("/tokenize", response_model_exclude_none=True)
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        info = model_lookup.requested_model(controller, only_model, request, body.model)
        tokenizer = controller.tokenizer(info.name)
        if body.messages is None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = tokenizer.encode(body.prompt, add_special_tokens=add_special)
        else:
            text = tokenizer.apply_chat_template(
                [message.template_message() for message in body.messages],
                **body.template_options(),
            )
            tokens = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        token_strs = None
        if body.return_token_strs:
            token_strs = [tokenizer.tokenizer.id_to_token(token) for token in tokens]
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=info.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        info = model_lookup.requested_model(controller, only_model, request, body.model)
        tokenizer = controller.tokenizer(info.name)
        out_of_range = [token for token in body.tokens if token >= tokenizer.vocab_size]
        if out_of_range:
            raise APIError(
                400,
                f"tokens: {out_of_range[0]} is not a token id of this model "
                f"(its vocabulary has {tokenizer.vocab_size})",
                "invalid_request",
            )
        # As vLLM: the text of every token, special ones included.
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))

    return router

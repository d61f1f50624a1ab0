"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from warmserve.api import model_lookup
from warmserve.api.generation import Generation
from warmserve.api.openai_schemas import (
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from warmserve.api.services import Services
from warmserve.api.sse import sse_response
from warmserve.api.structured_schemas import FunctionCall, MessageToolCall
from warmserve.api.tool_calls import ToolCalling, new_tool_call_id
from warmserve.controller.types import GenerationChunk, ModelInfo


def usage_of(chunk: GenerationChunk) -> Usage:
    return Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


async def completion_chunks(
    generation: Generation, response_id: str, created: int, include_usage: bool
) -> AsyncIterator[Completion]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=response_id, created=created, model=generation.model, choices=choices, usage=usage
        )

    async for piece in generation.chunks():
        if piece.text or piece.finish_reason:
            yield chunk([CompletionChoice(text=piece.text, finish_reason=piece.finish_reason)])
    if include_usage:
        yield chunk([], usage_of(generation.last))


def reply_finish_reason(called_tools: bool, finish_reason: str) -> str:
    return "tool_calls" if called_tools and finish_reason == "stop" else finish_reason


async def chat_chunks(
    generation: Generation,
    response_id: str,
    created: int,
    include_usage: bool,
    calling: ToolCalling,
) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=response_id, created=created, model=generation.model, choices=choices, usage=usage
        )

    reply = calling.reply_stream()
    yield chunk([ChatChunkChoice(delta={"role": "assistant", "content": ""})])
    async for piece in generation.chunks():
        deltas = reply.feed(piece.text)
        if piece.finish_reason:
            deltas += reply.finish()
        for delta in deltas:
            yield chunk([ChatChunkChoice(delta=delta)])
        if piece.finish_reason:
            finish_reason = reply_finish_reason(reply.called, piece.finish_reason)
            yield chunk([ChatChunkChoice(delta={}, finish_reason=finish_reason)])
    if include_usage:
        yield chunk([], usage_of(generation.last))


def openai_router(services: Services, only_model: str | None) -> APIRouter:
    """With `only_model`, the routes serve that model alone (a per-model port): requests may
    leave out "model", and naming another model is a 404."""
    router = APIRouter()
    controller = services.controller

    def model_card(info: ModelInfo) -> ModelCard:
        return ModelCard(
            id=info.name,
            created=int(services.started_at),
            state=info.state,
            max_model_len=info.max_model_len,
            tensor_parallel_size=info.tensor_parallel_size,
            workers=info.workers,
            port=info.port or services.listeners.port_of(info.name),
            keep_alive=info.keep_alive,
            pinned=info.pinned,
        )

    def requested_model(request: Request, name: str | None) -> ModelInfo:
        return model_lookup.requested_model(controller, only_model, request, name)

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        models = controller.models()
        if only_model is not None:
            models = [info for info in models if info.name == only_model]
        return ModelList(data=[model_card(info) for info in models])

    @router.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str, request: Request) -> ModelCard:
        return model_card(requested_model(request, model_id))

    @router.post("/v1/completions", response_model=None)
    async def create_completion(
        body: CompletionRequest, request: Request
    ) -> Completion | StreamingResponse:
        info = requested_model(request, body.model)
        model_defaults = controller.tokenizer(info.name).generation_defaults
        params = body.sampling_params(COMPLETION_DEFAULT_MAX_TOKENS, model_defaults)
        generation = Generation(
            controller, services.metrics, info.name, body.prompt, params, body.keep_alive
        )
        await generation.start()
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse_response(
                completion_chunks(generation, response_id, created, body.include_usage_chunk)
            )
        text = await generation.collect()
        return Completion(
            id=response_id,
            created=created,
            model=info.name,
            choices=[CompletionChoice(text=text, finish_reason=generation.last.finish_reason)],
            usage=usage_of(generation.last),
        )

    @router.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletion | StreamingResponse:
        info = requested_model(request, body.model)
        tokenizer = controller.tokenizer(info.name)
        calling = body.tool_calling()
        prompt = tokenizer.chat_token_ids(
            [m.template_message() for m in body.messages],
            tools=calling.template_tools(),
            **body.template_options(),
        )
        params = body.sampling_params(CHAT_DEFAULT_MAX_TOKENS, tokenizer.generation_defaults)
        generation = Generation(
            controller, services.metrics, info.name, prompt, params, body.keep_alive
        )
        await generation.start()
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse_response(
                chat_chunks(generation, response_id, created, body.include_usage_chunk, calling)
            )
        reply = calling.reply(await generation.collect())
        tool_calls = [
            MessageToolCall(id=new_tool_call_id(), function=FunctionCall(**vars(call)))
            for call in reply.tool_calls
        ]
        finish_reason = reply_finish_reason(bool(tool_calls), generation.last.finish_reason)
        return ChatCompletion(
            id=response_id,
            created=created,
            model=info.name,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=reply.content, tool_calls=tool_calls or None),
                    finish_reason=finish_reason,
                )
            ],
            usage=usage_of(generation.last),
        )

    return router

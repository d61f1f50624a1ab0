"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from warmserve.api import model_lookup
from warmserve.api.choices import Choices
from warmserve.api.generation import Generation
from warmserve.api.logprobs import chat_logprobs, completion_logprobs
from warmserve.api.openai_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    ModelCard,
    ModelList,
    Usage,
)
from warmserve.api.openai_schemas import (
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)
from warmserve.api.services import Services
from warmserve.api.sse import TextChunkEvents, sse_response
from warmserve.api.structured_schemas import FunctionCall, MessageToolCall
from warmserve.api.tool_calls import ParsedReply, ToolCalling, new_tool_call_id
from warmserve.config import SamplingParams
from warmserve.controller.types import ModelInfo


async def completion_chunks(
    choices: Choices,
    echoes: list[str],
    response_id: str,
    created: int,
    body: CompletionRequest,
    model: str,
) -> AsyncIterator[Completion | str]:
    """`echoes`: per choice, the prompt text that goes before its first chunk ("" without echo).
    Plain text chunks come encoded (TextChunkEvents), the others as models."""

    def chunk(parts: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=response_id, created=created, model=model, choices=parts, usage=usage)

    text_events = TextChunkEvents(
        lambda index, text: chunk([CompletionChoice(index=index, text=text)])
    )

    echoes = list(echoes)
    offsets = [0] * len(echoes)  # where each choice's next token starts in its text
    async for index, piece in choices.chunks():
        text, echoes[index] = echoes[index] + piece.text, ""
        logprobs = None
        if piece.logprobs is not None:
            tokens = [*(piece.prompt_logprobs or ()), *piece.logprobs]
            logprobs = completion_logprobs(
                tokens, offsets[index], bool(body.return_tokens_as_token_ids)
            )
            offsets[index] += sum(len(token.token) for token in tokens)
        # A chunk for every step that produced tokens, as vLLM sends, even when their text is
        # held back (an incomplete character, a possible stop string): clients time tokens by it.
        if logprobs is None and piece.finish_reason is None:
            if text or piece.token_ids:
                yield text_events.event(index, text)
        elif text or piece.token_ids or piece.finish_reason or logprobs:
            yield chunk(
                [
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=piece.finish_reason,
                    )
                ]
            )
    if body.include_usage_chunk:
        yield chunk([], choices.usage())


def message_tool_calls(reply: ParsedReply) -> list[MessageToolCall]:
    return [
        MessageToolCall(id=new_tool_call_id(), function=FunctionCall(**vars(call)))
        for call in reply.tool_calls
    ]


def reply_finish_reason(called_tools: bool, finish_reason: str) -> str:
    return "tool_calls" if called_tools and finish_reason == "stop" else finish_reason


async def chat_chunks(
    choices: Choices,
    response_id: str,
    created: int,
    body: ChatCompletionRequest,
    model: str,
    calling: ToolCalling,
) -> AsyncIterator[ChatCompletionChunk | str]:
    """Plain content deltas come encoded (TextChunkEvents), the other chunks as models."""

    def chunk(parts: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=response_id, created=created, model=model, choices=parts, usage=usage
        )

    content_events = TextChunkEvents(
        lambda index, text: chunk([ChatChunkChoice(index=index, delta={"content": text})])
    )

    replies = [calling.reply_stream() for _ in choices.generations]
    for index in range(len(replies)):
        yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
    async for index, piece in choices.chunks():
        reply = replies[index]
        deltas = reply.feed(piece.text)
        if piece.finish_reason:
            deltas += reply.finish()
        logprobs = None
        if piece.logprobs is not None:
            logprobs = chat_logprobs(piece.logprobs, bool(body.return_tokens_as_token_ids))
        if piece.token_ids and not deltas and (logprobs or not calling.tools):
            # Tokens whose text is held back (an incomplete character, a possible stop string)
            # still make a chunk, as with vLLM: clients time tokens by the chunks. Text a tool
            # call's parser holds back stays silent until it is known to be content or a call.
            deltas = [{"content": ""}]
        for position, delta in enumerate(deltas):
            if logprobs is None and delta.keys() == {"content"}:
                yield content_events.event(index, delta["content"])
                continue
            yield chunk(
                [
                    ChatChunkChoice(
                        index=index, delta=delta, logprobs=logprobs if position == 0 else None
                    )
                ]
            )
        if piece.finish_reason:
            finish_reason = reply_finish_reason(reply.called, piece.finish_reason)
            yield chunk([ChatChunkChoice(index=index, delta={}, finish_reason=finish_reason)])
    if body.include_usage_chunk:
        yield chunk([], choices.usage())


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

    def generation_of(model: str, keep_alive: float | None):
        def make(prompt: str | list[int], params: SamplingParams) -> Generation:
            return Generation(controller, services.metrics, model, prompt, params, keep_alive)

        return make

    @router.post("/v1/completions", response_model=None)
    async def create_completion(
        body: CompletionRequest, request: Request
    ) -> Completion | StreamingResponse:
        info = requested_model(request, body.model)
        model_defaults = controller.tokenizer(info.name).generation_defaults
        params = body.sampling_params(COMPLETION_DEFAULT_MAX_TOKENS, body.logprobs, model_defaults)
        if body.echo and body.logprobs is not None:  # the echoed prompt's tokens are scored too
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        echoes = [""] * len(body.prompt) * body.num_samples
        if body.echo:
            tokenizer = controller.tokenizer(info.name)
            echoes = [
                prompt if isinstance(prompt, str) else tokenizer.decode(prompt, False)
                for prompt in body.prompt
                for _ in range(body.num_samples)
            ]
        choices = await Choices.start(
            generation_of(info.name, body.keep_alive), body.prompt, params, body.num_samples
        )
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse_response(
                completion_chunks(choices, echoes, response_id, created, body, info.name)
            )
        collected = await choices.collect()
        return Completion(
            id=response_id,
            created=created,
            model=info.name,
            choices=[
                CompletionChoice(
                    index=index,
                    text=echo + choice.text,
                    logprobs=completion_logprobs(
                        choice.logprobs, 0, bool(body.return_tokens_as_token_ids)
                    )
                    if body.logprobs is not None
                    else None,
                    finish_reason=choice.finish_reason,
                )
                for index, (echo, choice) in enumerate(zip(echoes, collected, strict=True))
            ],
            usage=choices.usage(),
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
        num_logprobs = body.num_logprobs
        params = body.sampling_params(
            CHAT_DEFAULT_MAX_TOKENS, num_logprobs, tokenizer.generation_defaults
        )
        choices = await Choices.start(
            generation_of(info.name, body.keep_alive), [prompt], params, body.num_samples
        )
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse_response(
                chat_chunks(choices, response_id, created, body, info.name, calling)
            )
        collected = await choices.collect()
        replies = [calling.reply(choice.text) for choice in collected]
        return ChatCompletion(
            id=response_id,
            created=created,
            model=info.name,
            choices=[
                ChatChoice(
                    index=index,
                    message=AssistantMessage(
                        content=reply.content, tool_calls=message_tool_calls(reply) or None
                    ),
                    logprobs=chat_logprobs(choice.logprobs, bool(body.return_tokens_as_token_ids))
                    if num_logprobs is not None
                    else None,
                    finish_reason=reply_finish_reason(bool(reply.tool_calls), choice.finish_reason),
                )
                for index, (choice, reply) in enumerate(zip(collected, replies, strict=True))
            ],
            usage=choices.usage(),
        )

    return router

"""The server's side of one deployment: tokenizes, sends requests to the lead worker, turns the
returned token stream back into text, and applies stop strings."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from warmserve.config import SamplingParams
from warmserve.controller.detokenizer import IncrementalDetokenizer
from warmserve.controller.errors import InvalidRequest, PromptTooLong
from warmserve.controller.tokenizer import ModelTokenizer
from warmserve.protocol import AbortRequest, AddRequest, TokenOutput


class RequestAborted(Exception):
    """The request ended without finishing: its model went away or its worker failed it."""


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of a streamed generation: new text and tokens since the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while generating
    prompt_tokens: int
    completion_tokens: int  # total so far


class EngineClient:
    def __init__(
        self,
        tokenizer: ModelTokenizer,
        max_model_len: int,
        vocab_size: int,
        deployment_id: str,
        send: Callable[[object], None],
    ):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.deployment_id = deployment_id
        self.send = send
        self.streams: dict[str, asyncio.Queue] = {}

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def deliver(self, output: TokenOutput) -> None:
        stream = self.streams.get(output.request_id)
        if stream is not None:
            stream.put_nowait(output)

    def fail(self, request_id: str, reason: str, invalid_request: bool = False) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.put_nowait(InvalidRequest(reason) if invalid_request else RequestAborted(reason))

    def fail_all(self, reason: str) -> None:
        for request_id in list(self.streams):
            self.fail(request_id, reason)

    def prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidRequest("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, and at least one must be left to generate"
            )
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})")
        return token_ids

    async def generate(
        self, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        token_ids = self.prompt_token_ids(prompt)
        request_id = uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = stream
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop)
        finished = False
        try:
            self.send(AddRequest(self.deployment_id, request_id, token_ids, params))
            generated = 0
            while not finished:
                item = await stream.get()
                batch = [item]
                while not stream.empty():  # the worker may be ahead of this consumer
                    batch.append(stream.get_nowait())
                for item in batch:
                    if isinstance(item, (RequestAborted, InvalidRequest)):
                        raise item
                new_tokens = [item.token_id for item in batch]
                finish_reason = batch[-1].finish_reason
                generated += len(new_tokens)
                text = detokenizer.add(new_tokens, finished=finish_reason is not None)
                if detokenizer.stop_matched is not None:
                    finish_reason = "stop"
                finished = finish_reason is not None
                yield GenerationChunk(text, new_tokens, finish_reason, len(token_ids), generated)
        finally:
            del self.streams[request_id]
            # Unfinished (the caller went away) or cut by a stop string: the worker stops too.
            if not finished or detokenizer.stop_matched is not None:
                self.send(AbortRequest(self.deployment_id, request_id))

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
from warmserve.protocol import AbortRequest, AddRequest, TokenLogprobs, TokenOutput


class RequestAborted(Exception):
    """The request ended without finishing: its model went away or its worker failed it."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token and its log-probability, and the most likely tokens', best first."""

    token_id: int
    token: str  # the token decoded alone
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: list[tuple[int, str, float]]  # (token id, text, log-probability)


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of a streamed generation: new text and tokens since the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while generating
    prompt_tokens: int
    completion_tokens: int  # total so far
    # One per token of token_ids, when the request asked for log-probabilities.
    logprobs: list[TokenLogprob] | None = None
    # In the first chunk, when the request asked for them: one per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None


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

    def check_sampling(self, params: SamplingParams) -> None:
        """What only the model can tell: token ids in logit_bias must be in its vocabulary."""
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise InvalidRequest(
                f"logit_bias: token id {outside[0]} is outside this model's vocabulary "
                f"[0, {self.vocab_size})"
            )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def decode_logprobs(self, logprobs: TokenLogprobs, token_id: int) -> TokenLogprob:
        top = zip(logprobs.top_token_ids, logprobs.top_logprobs, strict=True)
        return TokenLogprob(
            token_id,
            self.token_text(token_id),
            logprobs.logprob,
            [(token, self.token_text(token), value) for token, value in top],
        )

    def decode_prompt_logprobs(
        self, token_ids: list[int], logprobs: list[TokenLogprobs]
    ) -> list[TokenLogprob]:
        first = TokenLogprob(token_ids[0], self.token_text(token_ids[0]), None, [])
        return [
            first,
            *(
                self.decode_logprobs(entry, token_id)
                for token_id, entry in zip(token_ids[1:], logprobs, strict=True)
            ),
        ]

    async def generate(
        self, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        token_ids = self.prompt_token_ids(prompt)
        self.check_sampling(params)
        request_id = uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = stream
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, token_ids, params.stop, min_tokens=params.min_tokens
        )
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
                logprobs = prompt_logprobs = None
                if params.logprobs is not None:
                    logprobs = [
                        self.decode_logprobs(item.logprobs, item.token_id) for item in batch
                    ]
                if params.prompt_logprobs is not None and generated == len(new_tokens):
                    # A one-token prompt has nothing to score: the engine sends no list.
                    prompt_logprobs = self.decode_prompt_logprobs(
                        token_ids, batch[0].prompt_logprobs or []
                    )
                yield GenerationChunk(
                    text,
                    new_tokens,
                    finish_reason,
                    len(token_ids),
                    generated,
                    logprobs,
                    prompt_logprobs,
                )
        finally:
            del self.streams[request_id]
            # Unfinished (the caller went away) or cut by a stop string: the worker stops too.
            if not finished or detokenizer.stop_matched is not None:
                self.send(AbortRequest(self.deployment_id, request_id))

"""One request's generation as the HTTP layer runs it.

The first chunk is awaited before any response byte is sent, so that the controller's refusals
(unknown model, prompt too long, bad token ids) become HTTP errors even for streams. The
controller's generator is closed on every exit path, client disconnects included, which is what
aborts the request in the worker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio

from warmserve.api.metrics import Metrics
from warmserve.config import SamplingParams
from warmserve.controller.types import GenerationChunk


class Generation:
    def __init__(
        self,
        controller,
        metrics: Metrics,
        model: str,
        prompt: str | list[int],
        params: SamplingParams,
        keep_alive: float | None = None,
    ):
        self.controller = controller
        self.metrics = metrics
        self.model = model
        self.prompt = prompt
        self.params = params
        self.keep_alive = keep_alive
        self.first: GenerationChunk | None = None
        self.last: GenerationChunk | None = None
        self._source: AsyncIterator[GenerationChunk] | None = None
        self._arrived_at = time.perf_counter()
        self._first_token_at: float | None = None
        self._tokens_at_first_token = 0
        self._last_at = self._arrived_at
        self._finished = False

    async def start(self) -> None:
        self._source = self.controller.generate(
            self.model, self.prompt, self.params, keep_alive=self.keep_alive
        )
        try:
            self.first = await anext(self._source)
        except BaseException:
            await self._close_source()
            raise
        self._observe(self.first)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """The first chunk again, then the rest as the worker produces them."""
        try:
            yield self.first
            async for chunk in self._source:
                self._observe(chunk)
                yield chunk
        finally:
            await self._close_source()
            self._record()

    async def close(self) -> None:
        """Ends a generation whose chunks will not be read (nothing if it never started)."""
        if self._source is not None:
            await self._close_source()

    def _observe(self, chunk: GenerationChunk) -> None:
        now = time.perf_counter()
        if self._first_token_at is None and chunk.completion_tokens > 0:
            self._first_token_at = now
            self._tokens_at_first_token = chunk.completion_tokens
        self._last_at = now
        self.last = chunk

    async def _close_source(self) -> None:
        # After a disconnect anyio keeps cancelling the streaming task; the shield lets the
        # controller's generator finish its clean-up (the abort sent to the worker).
        with anyio.CancelScope(shield=True):
            await self._source.aclose()

    def _record(self) -> None:
        if self._finished or self.last is None:
            return
        self._finished = True
        time_to_first_token = time_per_output_token = None
        if self._first_token_at is not None:
            time_to_first_token = self._first_token_at - self._arrived_at
            later_tokens = self.last.completion_tokens - self._tokens_at_first_token
            if later_tokens > 0:
                time_per_output_token = (self._last_at - self._first_token_at) / later_tokens
        self.metrics.record_generation(
            self.model,
            self.last.prompt_tokens,
            self.last.completion_tokens,
            time_to_first_token,
            time_per_output_token,
        )

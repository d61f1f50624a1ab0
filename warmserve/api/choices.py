"""A request's choices: one generation per prompt and sample (`n`), run concurrently.

Choice `index` is prompt-major, as OpenAI numbers them: prompt p's sample s is p * n + s. Each
generation is its own request to the engine; with a seed, sample s draws with `seed + s` (vLLM's
rule), so that n seeded samples differ from each other and each is reproducible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import anyio

from warmserve.api.generation import Generation
from warmserve.api.openai_responses import Usage
from warmserve.api.openai_schemas import SEED_MAX, SEED_MIN
from warmserve.config import SamplingParams
from warmserve.controller.engine_client import GenerationChunk, TokenLogprob


def sample_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    if params.seed is None:
        return [params] * n
    span = SEED_MAX - SEED_MIN + 1
    return [
        replace(params, seed=(params.seed + sample - SEED_MIN) % span + SEED_MIN)
        for sample in range(n)
    ]


class Choices:
    def __init__(self, generations: list[Generation], samples_per_prompt: int):
        self.generations = generations
        self.samples_per_prompt = samples_per_prompt

    @classmethod
    async def start(
        cls,
        make_generation: Callable[[str | list[int], SamplingParams], Generation],
        prompts: list[str | list[int]],
        params: SamplingParams,
        n: int,
    ) -> Choices:
        """Every generation's first chunk is awaited before this returns, so that a refusal is
        an HTTP error; if one is refused (or the client leaves), the others are ended."""
        generations = [
            make_generation(prompt, sample)
            for prompt in prompts
            for sample in sample_params(params, n)
        ]
        try:
            results = await asyncio.gather(
                *(generation.start() for generation in generations), return_exceptions=True
            )
            failures = [result for result in results if isinstance(result, BaseException)]
            if failures:
                raise failures[0]
        except BaseException:
            with anyio.CancelScope(shield=True):
                for generation in generations:
                    await generation.close()
            raise
        return cls(generations, n)

    def usage(self) -> Usage:
        """The prompt counted once per prompt, completion tokens summed over every choice."""
        firsts = self.generations[:: self.samples_per_prompt]
        prompt_tokens = sum(generation.last.prompt_tokens for generation in firsts)
        completion_tokens = sum(
            generation.last.completion_tokens for generation in self.generations
        )
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def chunks(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """(choice index, chunk) as the generations produce them; leaving early ends them all."""
        if len(self.generations) == 1:
            chunks = self.generations[0].chunks()
            try:
                async for chunk in chunks:
                    yield 0, chunk
            finally:
                await chunks.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            chunks = generation.chunks()
            try:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk))
                queue.put_nowait((index, None))
            except Exception as exc:  # raised again by the consumer, in its task
                queue.put_nowait((index, exc))
            finally:
                await chunks.aclose()

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.generations)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            # Each generation's clean-up (the abort sent to its worker) runs to its end.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self) -> list[CollectedChoice]:
        collected = [CollectedChoice() for _ in self.generations]
        async for index, chunk in self.chunks():
            choice = collected[index]
            choice.text += chunk.text
            choice.finish_reason = chunk.finish_reason
            choice.logprobs.extend(chunk.prompt_logprobs or ())
            choice.logprobs.extend(chunk.logprobs or ())
        return collected


@dataclass
class CollectedChoice:
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's first, if echoed

"""Helpers shared by the end-to-end tests: checkpoints and the transformers reference."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import torch

from warmserve import SamplingParams
from warmserve.testing.checkpoints import ensure_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

PROMPTS = [
    "Hello there, how are",
    "The quick brown fox",
    "Once upon a time in a land far away, there lived",
    "a",
]


# Each tiny test model's footprint on its worker is about 12 MB (weights, activation reserve and
# its minimum KV cache; the rest of its cache is elastic): a worker of this size holds exactly
# one of them, as a GPU holds one large model.
ONE_MODEL_PER_WORKER_GB = 0.016


def run_controller(scenario, **config):
    """Runs `await scenario(controller)` against a fresh controller with (by default) two CPU
    workers."""
    from warmserve import Controller, ServerConfig

    config = {"device": "cpu", "workers": 2, **config}

    async def main():
        async with Controller(ServerConfig(**config)) as controller:
            return await scenario(controller)

    return asyncio.run(main())


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Three small models of different families, built once per folder."""
    return {
        "qwen3": ensure_checkpoint(root / "qwen3-tiny", "qwen3"),
        "opt": ensure_checkpoint(root / "opt-tiny", "opt"),
        "llama": ensure_checkpoint(root / "llama-tiny", "llama"),
    }


@functools.lru_cache(maxsize=8)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # No end-of-sequence token: generation runs its full length and, unlike min_new_tokens,
    # never masks the EOS ids out of the choice (the engine runs with ignore_eos).
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt_ids` (EOS ignored, as with ignore_eos)."""
    model = _hf_model(str(path))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


async def generate_ids(controller, name, prompt, params=GREEDY) -> list[int]:
    """A completion's token ids through `Controller.generate`."""
    tokens = []
    async for chunk in controller.generate(name, prompt, params):
        tokens.extend(chunk.token_ids)
    return tokens

"""How much memory a model takes on its worker: weights, KV cache (a minimum and a maximum: the
cache grows and shrinks in the worker's KV pool) and a step's activations.

One home for these figures: the engine sizes its KV cache with them, and the controller (which
does not import torch) estimates a model's footprint with them before it places the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.config import EngineConfig
from warmserve.models.config import ModelConfig


@dataclass(frozen=True)
class MemoryPlan:
    """A model's KV cache is elastic: it may grow to `max_blocks` (the most it could ever use on
    its worker) and always keeps `min_blocks` (what placement counts in its footprint)."""

    max_blocks: int
    min_blocks: int
    max_model_len: int
    min_kv_bytes: int
    activation_bytes: int


def kv_block_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, itemsize: int
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def activation_reserve(
    config: ModelConfig, engine_config: EngineConfig, max_model_len: int, itemsize: int
) -> int:
    """A bound on the memory a step's activations take, kept free of the KV cache: a step runs
    at most `max_num_batched_tokens` tokens (longer prompts are prefilled in chunks)."""
    tokens = engine_config.max_num_batched_tokens
    width = 4 * config.hidden_size + 3 * config.intermediate_size
    logits = engine_config.max_num_seqs * config.vocab_size * 4 * 2
    return tokens * width * itemsize + logits


def plan_memory(
    config: ModelConfig,
    engine_config: EngineConfig,
    *,
    weights_bytes: int,
    itemsize: int,
    block_bytes: int,
    max_model_len: int | None,
    budget_bytes: int | None,
) -> MemoryPlan:
    """The KV cache a model may have: at most blocks for `max_num_seqs` sequences of its full
    context, no more than what `budget_bytes` (the worker's usable memory less the other
    models' weights and activations) leaves after its own weights and activations; at least
    blocks for `min_kv_tokens` tokens (one sequence of a long context always runs). A fixed
    `kv_cache_bytes` makes both bounds that size. `max_blocks` < 1 means the model does not
    fit."""
    limit = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    block_size = engine_config.block_size
    activations = activation_reserve(config, engine_config, limit, itemsize)
    max_blocks = engine_config.max_num_seqs * -(-limit // block_size)
    if engine_config.kv_cache_bytes is not None:
        max_blocks = min(max_blocks, engine_config.kv_cache_bytes // block_bytes)
    if budget_bytes is not None:
        max_blocks = min(max_blocks, (budget_bytes - weights_bytes - activations) // block_bytes)
    if engine_config.kv_cache_bytes is not None:
        min_blocks = max_blocks
    else:
        min_blocks = min(max_blocks, -(-min(limit, engine_config.min_kv_tokens) // block_size))
    min_blocks = max(min_blocks, 0)
    return MemoryPlan(
        max_blocks=max_blocks,
        min_blocks=min_blocks,
        max_model_len=min(limit, max(max_blocks, 0) * block_size),
        min_kv_bytes=min_blocks * block_bytes,
        activation_bytes=activations,
    )


def estimate_footprint(
    config: ModelConfig,
    engine_config: EngineConfig,
    *,
    weights_bytes: int,
    itemsize: int,
    max_model_len: int | None,
    tensor_parallel_size: int = 1,
) -> int:
    """What a model takes on each of its workers for placement: weights, activations and its
    minimum KV cache (the rest of its cache is elastic: taken from the worker's KV pool as it
    runs, and given back when another model needs the memory)."""
    kv_heads = max(1, config.num_kv_heads // tensor_parallel_size)
    block_bytes = kv_block_bytes(
        config.num_layers, kv_heads, config.head_dim, engine_config.block_size, itemsize
    )
    plan = plan_memory(
        config,
        engine_config,
        weights_bytes=weights_bytes,
        itemsize=itemsize,
        block_bytes=block_bytes,
        max_model_len=max_model_len,
        budget_bytes=None,
    )
    return weights_bytes + plan.min_kv_bytes + plan.activation_bytes

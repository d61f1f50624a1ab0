"""How much memory a model takes on its worker: weights, KV cache and a step's activations.

One home for these figures: the engine sizes its KV cache with them, and the controller (which
does not import torch) estimates a model's footprint with them before it places the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.config import EngineConfig
from warmserve.models.config import ModelConfig


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    max_model_len: int
    kv_cache_bytes: int
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
    """The KV cache a model gets: blocks for `max_num_seqs` sequences of its full context, no
    more than what `budget_bytes` leaves after the weights and activations, no more than the
    engine's cap. `num_blocks` < 1 means the model does not fit."""
    limit = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    block_size = engine_config.block_size
    activations = activation_reserve(config, engine_config, limit, itemsize)
    kv_budget = engine_config.kv_cache_bytes
    if kv_budget is None and budget_bytes is not None:
        kv_budget = budget_bytes - weights_bytes - activations
    if kv_budget is None:
        kv_budget = engine_config.max_kv_cache_bytes
    kv_budget = min(kv_budget, engine_config.max_kv_cache_bytes)
    wanted_blocks = engine_config.max_num_seqs * -(-limit // block_size)
    num_blocks = min(wanted_blocks, kv_budget // block_bytes)
    return MemoryPlan(
        num_blocks=num_blocks,
        max_model_len=min(limit, max(num_blocks, 0) * block_size),
        kv_cache_bytes=max(num_blocks, 0) * block_bytes,
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
    """What a model will take on each of its workers when memory is plentiful."""
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
    return weights_bytes + plan.kv_cache_bytes + plan.activation_bytes

"""OPT: learned positions (offset by 2), ReLU MLP, pre- or post-layer-norm blocks, optional
projections between a narrower word embedding and the hidden size."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.layers.attention import AttentionMetadata, PagedAttention
from warmserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from warmserve.layers.norm import LayerNorm
from warmserve.layers.parallel import divide, tp_world_size
from warmserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from warmserve.models.config import ModelConfig
from warmserve.models.weights import FUSED_PROJECTIONS, Target, fused_target, load_parameters

POSITION_OFFSET = 2  # OPT's position table reserves its first two rows
ATTENTION_PROJECTIONS = {
    name: FUSED_PROJECTIONS[name] for name in ("q_proj", "k_proj", "v_proj")
}  # fc1 and fc2 have nothing to stack with


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool):
        super().__init__()
        hidden = config.hidden_size
        heads = divide(config.num_heads, tp_world_size(), "number of attention heads")
        self.qkv_proj = MergedColumnParallelLinear(hidden, [hidden, hidden, hidden], bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias)
        self.attn = PagedAttention(heads, config.head_dim, heads, config.head_dim**-0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.out_proj(self.attn(self.qkv_proj(x), meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool, norm_before: bool, affine: bool):
        super().__init__()
        self.norm_before = norm_before
        self.self_attn = OPTAttention(config, bias)
        self.self_attn_layer_norm = LayerNorm(config.hidden_size, bias=affine)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias)
        self.final_layer_norm = LayerNorm(config.hidden_size, bias=affine)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        residual = hidden
        if self.norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, meta)
        if not self.norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.norm_before:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(F.relu(self.fc1(hidden)))
        if not self.norm_before:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.raw
        bias = raw.get("enable_bias", True)
        affine = raw.get("layer_norm_elementwise_affine", True)
        norm_before = raw.get("do_layer_norm_before", True)
        word_dim = raw.get("word_embed_proj_dim") or config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size
        ).requires_grad_(False)
        projected = word_dim != config.hidden_size
        self.project_in = (
            ReplicatedLinear(word_dim, config.hidden_size, False) if projected else None
        )
        self.project_out = (
            ReplicatedLinear(config.hidden_size, word_dim, False) if projected else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, bias, norm_before, affine) for _ in range(config.num_layers)
        )
        keep_final_norm = norm_before and not raw.get("_remove_final_layer_norm", False)
        self.final_layer_norm = (
            LayerNorm(config.hidden_size, bias=affine) if keep_final_norm else None
        )

    def forward(self, input_ids, positions, meta):
        embeds = self.embed_tokens(input_ids)
        if self.project_in is not None:
            embeds = self.project_in(embeds)
        hidden = embeds + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(config)
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            word_dim = config.raw.get("word_embed_proj_dim") or config.hidden_size
            self.lm_head = ParallelLMHead(config.vocab_size, word_dim)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.decoder.embed_tokens if self.lm_head is None else self.lm_head
        return head.compute_logits(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def parameter_name(self, checkpoint_name: str) -> Target | None:
        """The parameter (and shard of a stacked one) that a checkpoint tensor loads into; None
        for tensors this model ignores."""
        if self.tie_word_embeddings and checkpoint_name == "lm_head.weight":
            return None
        # Some OPT checkpoints name tensors "decoder.*" rather than "model.decoder.*".
        if checkpoint_name.startswith("decoder."):
            checkpoint_name = f"model.{checkpoint_name}"
        return fused_target(checkpoint_name, ATTENTION_PROJECTIONS)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_parameters(self, tensors)

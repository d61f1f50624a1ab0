"""The Llama family: Llama (2, 3, 3.1 rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.layers.attention import AttentionMetadata, PagedAttention
from warmserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from warmserve.layers.norm import RMSNorm
from warmserve.layers.parallel import divide, tp_world_size
from warmserve.layers.rotary import RotaryEmbedding
from warmserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from warmserve.models.config import ModelConfig
from warmserve.models.weights import FUSED_PROJECTIONS, Target, fused_target, load_parameters


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, qkv_bias: bool, qk_norm: bool, sliding_window: int | None
    ):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        tp = tp_world_size()
        heads = divide(config.num_heads, tp, "number of attention heads")
        kv_heads = divide(config.num_kv_heads, tp, "number of key/value heads")
        kv_size = config.num_kv_heads * head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            hidden, [config.num_heads * head_dim, kv_size, kv_size], qkv_bias
        )
        self.o_proj = RowParallelLinear(config.num_heads * head_dim, hidden)
        self.q_norm = RMSNorm(head_dim, config.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.norm_eps) if qk_norm else None
        self.attn = PagedAttention(heads, head_dim, kv_heads, head_dim**-0.5, sliding_window)

    def forward(self, rotary: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta):
        attended = self.attn(self.qkv_proj(x), meta, rotary, self.q_norm, self.k_norm)
        return self.o_proj(attended)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size])
        self.down_proj = RowParallelLinear(size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if x.is_cuda:
            from warmserve.layers.triton_fused import silu_and_mul  # triton: GPU hosts only

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm, config.sliding_windows[layer])
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, rotary, hidden, residual, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rotary, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, qk_norm, layer)
            for layer in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        rotary = self.rotary(positions)
        for layer in self.layers:
            hidden, residual = layer(rotary, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias_default = False
    qk_norm = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        qkv_bias = bool(config.raw.get("attention_bias", self.qkv_bias_default))
        self.model = LlamaModel(config, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.compute_logits(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def parameter_name(self, checkpoint_name: str) -> Target | None:
        """The parameter (and shard of a stacked one) that a checkpoint tensor loads into; None
        for tensors this model ignores."""
        if "rotary_emb.inv_freq" in checkpoint_name:
            return None
        if self.tie_word_embeddings and checkpoint_name == "lm_head.weight":
            return None
        return fused_target(checkpoint_name, FUSED_PROJECTIONS)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_parameters(self, tensors)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

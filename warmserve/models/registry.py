"""Picks the model class from config.json's `architectures`."""

from __future__ import annotations

from torch import nn

from warmserve.models.config import ModelConfig
from warmserve.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from warmserve.models.opt import OPTForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


class UnsupportedArchitecture(ValueError):
    pass


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return ARCHITECTURES[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture {config.architecture!r} is not supported (supported: {supported})"
        ) from None

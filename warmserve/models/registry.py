"""Picks the model class from config.json's `architectures`."""

from __future__ import annotations

from torch import nn

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


def model_class(raw_config: dict) -> type[nn.Module]:
    """The class for config.json's first architecture."""
    architectures = raw_config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitecture("config.json names no 'architectures'")
    try:
        return ARCHITECTURES[architectures[0]]
    except (KeyError, TypeError):
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture {architectures[0]!r} is not supported (supported: {supported})"
        ) from None

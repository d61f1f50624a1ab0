"""Picks the model class from config.json's `architectures`."""

from __future__ import annotations

from torch import nn

from warmserve.models.config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitecture,
    architecture_of,
)
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
__all__ = ["ARCHITECTURES", "UnsupportedArchitecture", "model_class"]


assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES), "models/config.py lists them too"


def model_class(raw_config: dict) -> type[nn.Module]:
    """The class for config.json's first architecture."""
    return ARCHITECTURES[architecture_of(raw_config)]

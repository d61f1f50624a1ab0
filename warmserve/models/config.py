"""The fields of a Hugging Face config.json that the models read, with the families' defaults."""

from __future__ import annotations

from dataclasses import dataclass

# The architectures (config.json `architectures[0]`) that `models/` implements.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "OPTForCausalLM",
)


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(raw_config: dict) -> str:
    """config.json's first architecture, if warmserve implements it."""
    architectures = raw_config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitecture("config.json names no 'architectures'")
    if not isinstance(architectures[0], str) or architectures[0] not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture {architectures[0]!r} is not supported (supported: {supported})"
        )
    return architectures[0]


@dataclass(frozen=True)
class ModelConfig:
    raw: dict
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    torch_dtype: str | None
    # Per layer: how many positions (the query's own included) its attention sees; None: all.
    sliding_windows: tuple[int | None, ...]

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures'")
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or (
            rope if rope.get("rope_type") not in (None, "default") else None
        )
        max_pos = int(raw.get("max_position_embeddings", 2048))
        num_layers = int(raw["num_hidden_layers"])
        return cls(
            raw=raw,
            architecture=architectures[0],
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw.get("intermediate_size") or raw.get("ffn_dim") or 4 * hidden),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=max_pos,
            norm_eps=float(raw.get("rms_norm_eps") or raw.get("layer_norm_eps") or 1e-5),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(
                raw.get("tie_word_embeddings", raw.get("model_type") == "opt")
            ),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            sliding_windows=sliding_windows(raw, num_layers),
        )


def sliding_windows(raw: dict, num_layers: int) -> tuple[int | None, ...]:
    """Which layers attend over a sliding window, as transformers reads it: `layer_types` where
    the config lists them; otherwise Mistral slides in every layer and Qwen2 from layer
    `max_window_layers` on, both only with a `sliding_window` (Qwen2: and `use_sliding_window`)."""
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window", True) is False:
        return (None,) * num_layers
    window = int(window)
    layer_types = raw.get("layer_types")
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    first = int(raw.get("max_window_layers", 0))
    return tuple(window if layer >= first else None for layer in range(num_layers))

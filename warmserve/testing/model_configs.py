"""The config.json of a random-weight checkpoint: each family's base, the shape presets (tiny
ones and the public models' dimensions), overrides as transformers reads them."""

from __future__ import annotations

import copy
import functools

from warmserve.config import DTYPE_ITEMSIZE
from warmserve.testing.tokenizer_files import BOS_ID, EOS_ID, PAD_ID

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")


# The config and index formats below are those this transformers release writes; the version is
# recorded in the files like transformers records its own.
TRANSFORMERS_FORMAT_VERSION = "5.23.0"


_DEFAULT_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}


_LLAMA_STYLE_BASE = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": _DEFAULT_ROPE,
    "tie_word_embeddings": False,
    "use_cache": True,
}


# Every key transformers writes for each architecture, at transformers' defaults; shape presets
# and overrides replace some of them, _complete_config derives the rest.
_FAMILY_BASE: dict[str, dict] = {
    "llama": {
        **_LLAMA_STYLE_BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    },
    "mistral": {
        **_LLAMA_STYLE_BASE,
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        # Like Mistral-7B-v0.3: full attention unless a fixture asks for a window.
        "sliding_window": None,
    },
    "qwen2": {
        **_LLAMA_STYLE_BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "max_window_layers": 28,
        "sliding_window": 4096,
        "use_sliding_window": False,
    },
    "qwen3": {
        **_LLAMA_STYLE_BASE,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "max_window_layers": 28,
        "sliding_window": 4096,
        "use_sliding_window": False,
    },
    "opt": {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "_remove_final_layer_norm": False,
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "do_layer_norm_before": True,
        "dropout": 0.1,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
    },
}


_TINY_DECODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


# Like Qwen3-0.6B, heads * head_dim differs from hidden_size, which an engine must not assume.
_TINY_QWEN3 = {**_TINY_DECODER, "head_dim": 32}


_TINY_OPT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "ffn_dim": 128,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


def _tiny_presets(**changes) -> dict[str, dict]:
    return {
        "llama": {**_TINY_DECODER, **changes},
        "mistral": {**_TINY_DECODER, **changes},
        "qwen2": {**_TINY_DECODER, **changes},
        "qwen3": {**_TINY_QWEN3, **changes},
        "opt": _TINY_OPT,
    }


# Shape name -> family -> config overrides. Real shapes carry the public models' dimensions and
# vocabulary sizes and exist only for their own family. Their tokenizer has only
# MAX_TOKENIZER_VOCAB tokens: ids a random model generates beyond those decode to nothing.
SHAPES: dict[str, dict] = {
    "tiny": _tiny_presets(),
    "tiny-mha": _tiny_presets(num_key_value_heads=4),
    "tiny-llama3-rope": {
        "llama": {
            **_TINY_DECODER,
            # original_max_position_embeddings is small enough that the 8 rotary frequencies of a
            # 16-wide head fall in all three llama3 bands: kept, interpolated and scaled down.
            "rope_parameters": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 128,
                "rope_theta": 500000.0,
                "rope_type": "llama3",
            },
        }
    },
    "opt-125m": {
        "opt": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "ffn_dim": 3072,
            "vocab_size": 50272,
            "max_position_embeddings": 2048,
        }
    },
    "qwen3-0.6b": {
        "qwen3": {
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 3072,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": True,
        }
    },
    "llama-3.2-1b": {
        "llama": {
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0,
                "rope_type": "llama3",
            },
            "tie_word_embeddings": True,
        }
    },
    "llama-3.1-8b": {
        "llama": {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0,
                "rope_type": "llama3",
            },
        }
    },
    "qwen3-8b": {
        "qwen3": {
            "hidden_size": 4096,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 12288,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        }
    },
}


# Fixed by the family, the tokenizer or build_checkpoint's own arguments (dtype, init_std,
# tie_word_embeddings); a shape override may not set them.
_RESERVED_KEYS = {
    "architectures",
    "model_type",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "initializer_range",
    "init_std",
    "transformers_version",
}


# Names older configs (and the Hub's checkpoints) use; folded into rope_parameters.
_LEGACY_ROPE_KEYS = {"rope_theta", "rope_scaling"}


def checkpoint_config(
    family: str,
    shape: str | dict,
    dtype: str,
    tie_word_embeddings: bool | None,
    init_std: float | None,
) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if dtype not in DTYPE_ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_ITEMSIZE)}")
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
        if family not in SHAPES[shape]:
            raise ValueError(
                f"shape {shape!r} is defined for {sorted(SHAPES[shape])}, not {family!r}"
            )
        overrides = SHAPES[shape][family]
    else:
        unknown = set(shape) - _overridable_keys(family)
        if unknown:
            raise ValueError(f"{family} configs have no key(s) {sorted(unknown)}")
        overrides = {**SHAPES["tiny"][family], **_fold_legacy_rope_keys(shape)}
    config = _complete_config(family, overrides)
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    config["dtype"] = dtype
    config[init_std_key(family)] = init_std if init_std is not None else _default_init_std(config)
    return config


def init_std_key(family: str) -> str:
    """Where the config records the weights' standard deviation, as transformers names it."""
    return "init_std" if family == "opt" else "initializer_range"


def _complete_config(family: str, overrides: dict) -> dict:
    """The full config.json of `family` with `overrides`, keys derived the way transformers
    derives them when it instantiates the config class."""
    config = copy.deepcopy({**_FAMILY_BASE[family], **overrides})
    config.update(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        transformers_version=TRANSFORMERS_FORMAT_VERSION,
    )
    if family == "opt":
        config.setdefault("word_embed_proj_dim", config["hidden_size"])
        return config
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    if family != "qwen2":
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if family in ("qwen2", "qwen3"):
        if not config["use_sliding_window"]:
            config["sliding_window"] = None
        config.setdefault(
            "layer_types",
            [
                "sliding_attention"
                if config["sliding_window"] is not None and layer >= config["max_window_layers"]
                else "full_attention"
                for layer in range(config["num_hidden_layers"])
            ],
        )
    return config


@functools.cache
def _overridable_keys(family: str) -> frozenset[str]:
    written = _complete_config(family, SHAPES["tiny"][family]).keys()
    legacy = _LEGACY_ROPE_KEYS if family != "opt" else set()
    return frozenset((written - _RESERVED_KEYS) | legacy)


def _fold_legacy_rope_keys(overrides: dict) -> dict:
    """Accept rope_theta / rope_scaling (the names in most Hub configs) as transformers does,
    folded into the rope_parameters it reads and writes."""
    if not _LEGACY_ROPE_KEYS & overrides.keys():
        return overrides
    folded = {key: value for key, value in overrides.items() if key not in _LEGACY_ROPE_KEYS}
    rope = {
        **overrides.get("rope_parameters", _DEFAULT_ROPE),
        **(overrides.get("rope_scaling") or {}),
    }
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    if "rope_theta" in overrides:
        rope["rope_theta"] = float(overrides["rope_theta"])
    folded["rope_parameters"] = rope
    return folded


def _default_init_std(config: dict) -> float:
    """1 / sqrt(hidden_size): each projection then keeps activations near unit scale, so that
    attention scores vary by about 1 (attention is neither uniform nor one-hot, and rotary
    positions change the result) and logits have a spread of about 1.

    Over 2,275 positions of the tiny presets, the top-1/top-2 logit gap has a median of 0.22
    (10^6 times float32 rounding) and exceeds 1e-3 at 99.6% of them, so an engine and
    transformers agree on greedy tokens. The usual 0.02 gives tiny models near-uniform
    attention and a median gap of 0.03."""
    return config["hidden_size"] ** -0.5

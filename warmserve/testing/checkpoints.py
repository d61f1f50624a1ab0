"""Random-weight Hugging Face checkpoints for tests and benchmarks.

A checkpoint is written in the layout transformers saves (config.json, safetensors weights,
generation_config.json, tokenizer.json, tokenizer_config.json) without instantiating a model:
each tensor is drawn from its own seeded generator and streamed to disk, so that even an 8B
checkpoint holds only a few tensors in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from warmserve.loader.checkpoint import SAFETENSORS_DTYPES
from warmserve.testing.model_configs import (
    TRANSFORMERS_FORMAT_VERSION,
    checkpoint_config,
    init_std_key,
)
from warmserve.testing.tokenizer_files import (
    BOS_ID,
    GENERATION_EOS_IDS,
    MAX_TOKENIZER_VOCAB,
    PAD_ID,
    build_tokenizer,
    write_json,
)

# safetensors' dtype codes by torch dtype name.
SAFETENSORS_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}


# Norm weights are 1 + N(0, this) and biases N(0, this): small next to unit-scale activations, yet
# large enough that an engine which ignores them no longer matches transformers.
_PERTURBATION_STD = 0.1


# Sharded checkpoints aim at shards of about this size, like the 2-5 GB shards on the Hub.
_SHARD_TARGET_BYTES = 4 * 10**9


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def build_checkpoint(
    path: str | os.PathLike,
    family: str,
    shape: str | dict = "tiny",
    *,
    dtype: str = "float32",
    seed: int = 0,
    sharded: bool = False,
    tie_word_embeddings: bool | None = None,
    overwrite: bool = False,
    init_std: float | None = None,
) -> Path:
    """Write a random-weight checkpoint of `family` with the `shape` preset (or a dict of config
    overrides of the tiny preset) into `path`, and return `path`.

    The same arguments always give the same bytes. Each tensor's values depend only on `seed`,
    `family` and the tensor's name, so sharded and unsharded checkpoints hold the same weights,
    and a bfloat16 one holds the float32 one's weights rounded.
    `init_std` defaults to hidden_size ** -0.5 (see _default_init_std).
    """
    target = Path(path)
    if not overwrite and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True")
    staging = _build_in_staging_dir(
        target,
        family,
        shape,
        dtype=dtype,
        seed=seed,
        sharded=sharded,
        tie_word_embeddings=tie_word_embeddings,
        init_std=init_std,
    )
    if overwrite and target.is_dir():
        shutil.rmtree(target)
    elif overwrite and target.exists():
        target.unlink()
    try:
        # Replaces an empty directory, refuses a non-empty one: the atomic final check.
        os.rename(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"{target} appeared while the checkpoint was built") from error
    return target


def ensure_checkpoint(
    path: str | os.PathLike, family: str, shape: str | dict = "tiny", **options
) -> Path:
    """Build the checkpoint unless `path/config.json` exists; return `path`.

    Only a complete checkpoint is ever renamed into `path`, so concurrent callers and crashed
    builds never leave a partial one there. `options` are build_checkpoint's, except overwrite.
    An existing checkpoint is not compared with the arguments: name paths after them.
    """
    target = Path(path)
    if (target / "config.json").is_file():
        return target
    staging = _build_in_staging_dir(target, family, shape, **options)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _build_in_staging_dir(
    target: Path,
    family: str,
    shape: str | dict,
    *,
    dtype: str = "float32",
    seed: int = 0,
    sharded: bool = False,
    tie_word_embeddings: bool | None = None,
    init_std: float | None = None,
) -> Path:
    config = checkpoint_config(family, shape, dtype, tie_word_embeddings, init_std)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling: on the same file system, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        # mkdtemp makes the directory private; a checkpoint cache is meant to be shared.
        staging.chmod(0o755)
        _write_checkpoint(staging, config, seed=seed, sharded=sharded)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _write_checkpoint(directory: Path, config: dict, *, seed: int, sharded: bool) -> None:
    dtype = getattr(torch, config["dtype"])
    specs = _tensor_specs(config, config[init_std_key(config["model_type"])])
    itemsize = dtype.itemsize
    # Families differ in their weights even where their tensor names coincide (llama, mistral).
    seed_key = f"{seed}/{config['model_type']}"
    if sharded:
        shards = _split_into_shards(specs, itemsize)
        file_names = [
            f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            for index in range(1, len(shards) + 1)
        ]
        for file_name, shard in zip(file_names, shards, strict=True):
            _write_safetensors(directory / file_name, shard, dtype, seed_key)
        index = {
            "metadata": {
                "total_parameters": sum(spec.numel for spec in specs),
                "total_size": sum(spec.numel for spec in specs) * itemsize,
            },
            "weight_map": {
                spec.name: file_name
                for file_name, shard in zip(file_names, shards, strict=True)
                for spec in shard
            },
        }
        write_json(directory / "model.safetensors.index.json", index)
    else:
        _write_safetensors(directory / "model.safetensors", specs, dtype, seed_key)

    write_json(directory / "config.json", config)
    generation_config = {
        "bos_token_id": BOS_ID,
        "eos_token_id": GENERATION_EOS_IDS,
        "pad_token_id": PAD_ID,
        "transformers_version": TRANSFORMERS_FORMAT_VERSION,
    }
    write_json(directory / "generation_config.json", generation_config)
    build_tokenizer(
        directory,
        min(config["vocab_size"], MAX_TOKENIZER_VOCAB),
        model_max_length=config["max_position_embeddings"],
    )


def _tensor_specs(config: dict, init_std: float) -> list[_TensorSpec]:
    """The state dict transformers expects, in module order."""
    if config["model_type"] == "opt":
        return _opt_tensor_specs(config, init_std)
    return _decoder_tensor_specs(config, init_std)


def _decoder_tensor_specs(config: dict, init_std: float) -> list[_TensorSpec]:
    family = config["model_type"]
    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    query_width = config["num_attention_heads"] * head_dim
    key_value_width = config["num_key_value_heads"] * head_dim
    intermediate = config["intermediate_size"]
    # Qwen2 always has q/k/v biases and no o_proj bias; llama and qwen3 follow attention_bias.
    qkv_bias = family == "qwen2" or config.get("attention_bias", False)
    output_bias = family != "qwen2" and config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)

    specs = [_TensorSpec("model.embed_tokens.weight", (vocab, hidden), 0.0, init_std)]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        specs.append(_norm(f"{prefix}.input_layernorm.weight", hidden))
        specs += _linear(f"{prefix}.self_attn.q_proj", query_width, hidden, qkv_bias, init_std)
        specs += _linear(f"{prefix}.self_attn.k_proj", key_value_width, hidden, qkv_bias, init_std)
        specs += _linear(f"{prefix}.self_attn.v_proj", key_value_width, hidden, qkv_bias, init_std)
        specs += _linear(f"{prefix}.self_attn.o_proj", hidden, query_width, output_bias, init_std)
        if family == "qwen3":
            specs.append(_norm(f"{prefix}.self_attn.q_norm.weight", head_dim))
            specs.append(_norm(f"{prefix}.self_attn.k_norm.weight", head_dim))
        specs.append(_norm(f"{prefix}.post_attention_layernorm.weight", hidden))
        specs += _linear(f"{prefix}.mlp.gate_proj", intermediate, hidden, mlp_bias, init_std)
        specs += _linear(f"{prefix}.mlp.up_proj", intermediate, hidden, mlp_bias, init_std)
        specs += _linear(f"{prefix}.mlp.down_proj", hidden, intermediate, mlp_bias, init_std)
    specs.append(_norm("model.norm.weight", hidden))
    if not config["tie_word_embeddings"]:
        specs.append(_TensorSpec("lm_head.weight", (vocab, hidden), 0.0, init_std))
    return specs


def _opt_tensor_specs(config: dict, init_std: float) -> list[_TensorSpec]:
    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    embed_dim = config["word_embed_proj_dim"]
    ffn = config["ffn_dim"]
    bias = config["enable_bias"]
    affine = config["layer_norm_elementwise_affine"]

    specs = [
        _TensorSpec("model.decoder.embed_tokens.weight", (vocab, embed_dim), 0.0, init_std),
        # OPT looks positions up at position + 2, a leftover of fairseq's padding offset.
        _TensorSpec(
            "model.decoder.embed_positions.weight",
            (config["max_position_embeddings"] + 2, hidden),
            0.0,
            init_std,
        ),
    ]
    if embed_dim != hidden:
        specs += _linear("model.decoder.project_out", embed_dim, hidden, False, init_std)
        specs += _linear("model.decoder.project_in", hidden, embed_dim, False, init_std)
    if config["do_layer_norm_before"] and not config["_remove_final_layer_norm"]:
        specs += _layer_norm("model.decoder.final_layer_norm", hidden, affine)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.decoder.layers.{layer}"
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            specs += _linear(f"{prefix}.self_attn.{projection}", hidden, hidden, bias, init_std)
        specs += _layer_norm(f"{prefix}.self_attn_layer_norm", hidden, affine)
        specs += _linear(f"{prefix}.fc1", ffn, hidden, bias, init_std)
        specs += _linear(f"{prefix}.fc2", hidden, ffn, bias, init_std)
        specs += _layer_norm(f"{prefix}.final_layer_norm", hidden, affine)
    if not config["tie_word_embeddings"]:
        specs.append(_TensorSpec("lm_head.weight", (vocab, embed_dim), 0.0, init_std))
    return specs


def _linear(
    prefix: str, out_features: int, in_features: int, bias: bool, init_std: float
) -> list[_TensorSpec]:
    specs = [_TensorSpec(f"{prefix}.weight", (out_features, in_features), 0.0, init_std)]
    if bias:
        specs.append(_TensorSpec(f"{prefix}.bias", (out_features,), 0.0, _PERTURBATION_STD))
    return specs


def _norm(name: str, size: int) -> _TensorSpec:
    return _TensorSpec(name, (size,), 1.0, _PERTURBATION_STD)


def _layer_norm(prefix: str, size: int, affine: bool) -> list[_TensorSpec]:
    if not affine:
        return []
    return [
        _norm(f"{prefix}.weight", size),
        _TensorSpec(f"{prefix}.bias", (size,), 0.0, _PERTURBATION_STD),
    ]


def _draw_tensors(
    specs: list[_TensorSpec], dtype: torch.dtype, seed_key: str
) -> Iterator[torch.Tensor]:
    """Yield the tensors of `specs` in order, drawn on a few threads (torch releases the GIL)
    with a bounded look-ahead, so that memory holds only a handful of tensors."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for spec in specs:
            pending.append(pool.submit(_draw_tensor, spec, dtype, seed_key))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _draw_tensor(spec: _TensorSpec, dtype: torch.dtype, seed_key: str) -> torch.Tensor:
    # A generator per tensor, seeded from its name: values do not depend on which other tensors
    # exist, on sharding or on drawing order. Drawn in float32 so that every dtype rounds the
    # same values.
    digest = hashlib.blake2b(f"{seed_key}/{spec.name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    values = torch.empty(spec.shape, dtype=torch.float32)
    values.normal_(spec.mean, spec.std, generator=generator)
    return values.to(dtype)


def _split_into_shards(specs: list[_TensorSpec], itemsize: int) -> list[list[_TensorSpec]]:
    """Consecutive runs of `specs` of about equal size; at least two, so that even a tiny
    checkpoint exercises the sharded-loading path."""
    total_bytes = sum(spec.numel for spec in specs) * itemsize
    shard_count = max(2, math.ceil(total_bytes / _SHARD_TARGET_BYTES))
    shards: list[list[_TensorSpec]] = [[]]
    assigned_bytes = 0
    for spec in specs:
        spec_bytes = spec.numel * itemsize
        shard_end = total_bytes * len(shards) / shard_count
        if shards[-1] and len(shards) < shard_count and assigned_bytes + spec_bytes > shard_end:
            shards.append([])
        shards[-1].append(spec)
        assigned_bytes += spec_bytes
    return shards


def _write_safetensors(
    file_path: Path, specs: list[_TensorSpec], dtype: torch.dtype, seed_key: str
) -> None:
    """Draw the tensors of `specs` into one safetensors file, streaming: the header is known
    from the specs alone, so no tensor has to wait in memory for the others."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = spec.numel * dtype.itemsize
        header[spec.name] = {
            "dtype": SAFETENSORS_CODES[str(dtype).removeprefix("torch.")],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # The format pads the header with spaces so that tensor data starts 8-byte aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(file_path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for tensor in _draw_tensors(specs, dtype, seed_key):
            file.write(tensor.reshape(-1).view(torch.uint8).numpy())

"""A GGUF file presented as a Checkpoint: Hugging Face tensor names, float32 tensors.

Quantized tensors are dequantized with the `gguf` package (as transformers does), the query and
key projections un-permuted (llama.cpp interleaves their rotary halves for its kernels), and the
result written once to a file in the user cache, keyed by the GGUF file's path, size and time.
The tensor index then points into that file, so the host weight store and the workers read a GGUF model exactly like a safetensors one, and a second server start skips the
dequantization.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from warmserve.loader.checkpoint import Checkpoint, CheckpointError, TensorInfo
from warmserve.loader.gguf_metadata import (
    GGUFHeader,
    derived_file,
    gguf_model_config,
    read_gguf_header,
    write_atomically,
)

TENSOR_ALIGNMENT = 64
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name (Llama family)."""
    match = LAYER_NAME.fullmatch(gguf_name)
    if match:
        layer, module, kind = match.groups()
        if module in LAYER_TENSORS:
            return f"model.layers.{layer}.{LAYER_TENSORS[module]}.{kind}"
    else:
        module, _, kind = gguf_name.rpartition(".")
        if module in GLOBAL_TENSORS:
            return f"{GLOBAL_TENSORS[module]}.{kind}"
    raise KeyError(gguf_name)


def reverse_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`)."""
    half_dim = weight.shape[0] // heads // 2
    return (
        weight.reshape(heads, half_dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)
    )


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: str | os.PathLike):
        header = read_gguf_header(path)
        self.path = header.path
        self.config = gguf_model_config(header)
        self.tensors = {}
        cursor = 0
        for tensor in header.tensors:
            try:
                name = hf_tensor_name(tensor.name)
            except KeyError:
                raise CheckpointError(
                    f"{self.path}: tensor {tensor.name!r} has no counterpart in "
                    f"{self.config['architectures'][0]}"
                ) from None
            nbytes = 4 * int(np.prod(tensor.shape))
            cursor = -(-cursor // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
            self.tensors[name] = (tensor, cursor, nbytes)
            cursor += nbytes
        self.dequantized_file = derived_file(self.path, ".f32")
        if not self.dequantized_file.is_file():
            _write_dequantized(header, self.config, self.tensors, self.dequantized_file, cursor)
        self.files = [self.dequantized_file]
        self.tensors = {
            name: TensorInfo(
                name, str(self.dequantized_file), "float32", 4, tensor.shape, offset, nbytes
            )
            for name, (tensor, offset, nbytes) in self.tensors.items()
        }


def dequantized_tensor(header: GGUFHeader, tensor, config: dict) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    try:
        kind = GGMLQuantizationType(tensor.ggml_type)
        block_size, block_bytes = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise CheckpointError(
            f"{header.path}: tensor {tensor.name!r} has an unknown GGML type {tensor.ggml_type}"
        ) from None
    count = int(np.prod(tensor.shape))
    raw = np.memmap(
        header.path, np.uint8, "r", tensor.offset, count // block_size * block_bytes
    ).reshape(*tensor.shape[:-1], tensor.shape[-1] // block_size * block_bytes)
    try:
        weight = dequantize(raw, kind).reshape(tensor.shape).astype(np.float32, copy=False)
    except NotImplementedError:
        raise CheckpointError(
            f"{header.path}: tensor {tensor.name!r}: {kind.name} cannot be dequantized"
        ) from None
    if ".attn_q." in tensor.name:
        weight = reverse_permute(weight, config["num_attention_heads"])
    elif ".attn_k." in tensor.name:
        weight = reverse_permute(weight, config["num_key_value_heads"])
    return weight


def _write_dequantized(
    header: GGUFHeader, config: dict, layout: dict, target: Path, size: int
) -> None:
    """Writes every tensor, dequantized, at its offset."""

    def write(handle) -> None:
        handle.truncate(size)
        for tensor, offset, _ in layout.values():
            handle.seek(offset)
            handle.write(np.ascontiguousarray(dequantized_tensor(header, tensor, config)))

    write_atomically(target, write)

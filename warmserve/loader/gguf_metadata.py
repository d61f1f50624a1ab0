"""A GGUF file's header: its metadata (key/value fields) and tensor index, read without torch or
numpy, and the Hugging Face config.json that the metadata describes.

The header is parsed here rather than with `gguf.GGUFReader`, which builds an object for every
element of every array (the vocabulary, the merges: seconds for a large vocabulary) before
anything can be read; a worker reads the config at every load, so only what is asked for is kept.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from warmserve.config import user_cache_dir
from warmserve.loader.checkpoint import CheckpointError

GGUF_SUFFIX = ".gguf"
# Bumped when what is derived from a GGUF file changes, so stale cache files are not read.
DERIVED_FORMAT = 1
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
SCALAR_FORMATS |= {10: "Q", 11: "q", 12: "d"}
STRING_TYPE, ARRAY_TYPE = 8, 9
# Architectures whose GGUF files warmserve maps onto its own models.
ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def is_gguf_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def derived_file(gguf_path: Path, suffix: str) -> Path:
    """Where a file derived from a GGUF file (its dequantized weights, its tokenizer.json) is
    kept: the user cache, under a name that changes with the GGUF file's path, size and time."""
    stat = gguf_path.stat()
    identity = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{DERIVED_FORMAT}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return user_cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}{suffix}"


def write_atomically(target: Path, write) -> None:
    """Calls `write(handle)` on a staging file renamed to `target` once complete: the file
    appears whole or not at all (several servers may derive it at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=target.parent, prefix=".staging-")
    try:
        with os.fdopen(descriptor, "r+b") as handle:
            write(handle)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy / torch order (GGUF lists dimensions innermost first)
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict
    tensors: list[GGUFTensor]


class _Reader:
    def __init__(self, handle, path: Path):
        self.handle, self.path = handle, path

    def read(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        return data

    def scalar(self, value_type: int):
        fmt = "<" + SCALAR_FORMATS[value_type]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar(10)
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, value_type: int, keep_arrays: bool):
        if value_type == STRING_TYPE:
            return self.string()
        if value_type == ARRAY_TYPE:
            element_type, count = self.scalar(4), self.scalar(10)
            if not keep_arrays and element_type in SCALAR_FORMATS:
                self.handle.seek(count * struct.calcsize(SCALAR_FORMATS[element_type]), 1)
                return count
            items = [self.value(element_type, keep_arrays) for _ in range(count)]
            return items if keep_arrays else count
        if value_type not in SCALAR_FORMATS:
            raise CheckpointError(f"{self.path}: unknown GGUF value type {value_type}")
        return self.scalar(value_type)


def read_gguf_header(path: str | os.PathLike, arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """The metadata and tensor index. Arrays are read in full only for the keys in `arrays`;
    the others are left as their element count."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        with open(path, "rb") as handle:
            reader = _Reader(handle, path)
            if reader.read(4) != GGUF_MAGIC:
                raise CheckpointError(f"{path}: not a GGUF file")
            version = reader.scalar(4)
            if version not in (2, 3):
                raise CheckpointError(f"{path}: GGUF version {version} is not supported")
            tensor_count, field_count = reader.scalar(10), reader.scalar(10)
            metadata = {}
            for _ in range(field_count):
                key = reader.string()
                metadata[key] = reader.value(reader.scalar(4), keep_arrays=key in arrays)
            infos = []
            for _ in range(tensor_count):
                name = reader.string()
                dims = [reader.scalar(10) for _ in range(reader.scalar(4))]
                infos.append((name, tuple(reversed(dims)), reader.scalar(4), reader.scalar(10)))
            alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
            data_start = -(-handle.tell() // alignment) * alignment
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    tensors = [
        GGUFTensor(name, shape, kind, data_start + offset) for name, shape, kind, offset in infos
    ]
    return GGUFHeader(path, metadata, tensors)


def gguf_model_config(header: GGUFHeader) -> dict:
    """config.json as transformers builds it from the metadata (its GGUF config mapping)."""
    metadata = header.metadata
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{header.path}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )

    def field(name: str, default=None):
        value = metadata.get(f"{architecture}.{name}", default)
        if value is None:
            raise CheckpointError(f"{header.path}: GGUF metadata has no {architecture}.{name}")
        return value

    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    names = {tensor.name for tensor in header.tensors}
    token_count = metadata.get("tokenizer.ggml.tokens")
    vocab_size = field("vocab_size", token_count)
    config = {
        "architectures": [ARCHITECTURES[architecture]],
        "model_type": architecture,
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(field("context_length")),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab_size),
        "hidden_act": "silu",
        # A file without an output matrix uses the embedding for it.
        "tie_word_embeddings": "output.weight" not in names,
        # Quantized weights are dequantized to float32, exactly as transformers does.
        "torch_dtype": "float32",
    }
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{name}")
        if token_id is not None:
            config[name.replace("padding", "pad")] = int(token_id)
    return config


def read_gguf_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """The resolved file and its config. A worker reads it at every load, a swap's included,
    so it is kept per file version."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise CheckpointError(f"{resolved}: GGUF file not found") from None
    return resolved, copy.deepcopy(_cached_config(resolved, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _cached_config(path: Path, size: int, mtime_ns: int) -> dict:
    return gguf_model_config(read_gguf_header(path))

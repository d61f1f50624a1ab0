"""Reads a Hugging Face checkpoint folder: config.json and safetensors files (single or sharded).

The safetensors headers are parsed here rather than through `safe_open` so that every tensor is
known by (file, byte range) before any data is read: the host weight store copies those byte
ranges in large chunks, and a truncated file is caught before anything is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype codes: the torch dtype name (without "torch.") and its size in bytes. The
# index is read by the server, which does not import torch; workers map names to torch dtypes.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # absolute path of the safetensors file
    dtype: str  # torch dtype name without the "torch." prefix
    itemsize: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{file}: truncated or corrupt safetensors header")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from exc
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: bad header entry for tensor {name!r}") from exc
        nbytes = end - begin
        expected = itemsize * _numel(shape)
        if nbytes != expected:
            raise CheckpointError(
                f"{file}: tensor {name!r} has {nbytes} bytes, its shape {shape} needs {expected}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{file}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{data_start + end}, the file has {size}"
            )
        tensors[name] = TensorInfo(
            name, str(file), dtype, itemsize, shape, data_start + begin, nbytes
        )
    return tensors


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_model_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """The resolved checkpoint folder and its config.json (for a .gguf file: the file and the
    config its metadata describes)."""
    from warmserve.loader.gguf_metadata import is_gguf_path, read_gguf_config

    if is_gguf_path(path):
        return read_gguf_config(path)
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    return folder, read_json(folder / "config.json")


class Checkpoint:
    """A checkpoint folder with its config and the index of every tensor it holds.

    `Checkpoint(path)` of a .gguf file is a GGUFCheckpoint (loader/gguf.py), which presents the
    file through this same interface.
    """

    def __new__(cls, path: str | os.PathLike):
        from warmserve.loader.gguf_metadata import is_gguf_path

        if cls is Checkpoint and is_gguf_path(path):
            from warmserve.loader.gguf import GGUFCheckpoint

            return super().__new__(GGUFCheckpoint)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike):
        self.path, self.config = read_model_config(path)
        self.files = self._safetensors_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self.tensors.update(read_safetensors_header(file))

    def _safetensors_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{file}: shard named in {index.name} not found")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

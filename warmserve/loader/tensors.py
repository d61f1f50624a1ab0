"""Worker side of a checkpoint: its tensors as CPU tensors that view memory maps of its files."""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Iterator

import torch

from warmserve.loader.checkpoint import Checkpoint, TensorInfo


def iter_checkpoint_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, CPU tensor) backed by a read-only memory map of each file."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for file, infos in by_file.items():
        with open(file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = memoryview(mapped)
        for info in infos:
            yield info.name, tensor_from_buffer(buffer, info)


def tensor_from_buffer(buffer: memoryview, info: TensorInfo) -> torch.Tensor:
    """A tensor viewing the tensor's bytes of `buffer` (no copy)."""
    dtype = getattr(torch, info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    raw = buffer[info.offset : info.offset + info.nbytes]
    # Read-only buffers make torch warn; these tensors are only ever read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(dtype).view(info.shape)

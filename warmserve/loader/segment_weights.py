"""Worker side of the host weight store: a segment mapped into a worker process, as one byte
tensor and per-tensor views, registered for DMA on a GPU host."""

from __future__ import annotations

import contextlib
import copy
import functools
import mmap
import os
import time

import torch

from warmserve.loader.weight_store import (
    READY_FAILED,
    READY_POLL_S,
    READY_WORD,
    SHM_DIR,
    ready_name,
)
from warmserve.protocol import TensorEntry, WeightSegment


class SegmentWeights:
    """Worker side: a segment mapped into this process, as one byte tensor and per-tensor views.

    On a GPU host the mapping can be registered for DMA (cudaHostRegister), so a copy from it
    runs at full PCIe speed; registering is slow, so it happens once per segment, off the swap
    path, and is kept until the store drops the segment.

    A segment of tensor-parallel shards is read through `rank_view`: the rank's span alone, as
    if it were a segment of its own.
    """

    def __init__(self, segment: WeightSegment):
        self.segment = segment
        # The bytes this object stands for: the whole segment, or one rank's span of it.
        self.rank: int | None = None
        self.base, self.size, self.entries = 0, segment.size, segment.tensors
        fd = os.open(os.path.join(SHM_DIR, segment.shm_name), os.O_RDWR)
        try:
            self._mapping = mmap.mmap(fd, segment.size)
        finally:
            os.close(fd)
        self.buffer = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self.registered = False
        fd = os.open(os.path.join(SHM_DIR, ready_name(segment.shm_name)), os.O_RDONLY)
        try:
            self._ready = mmap.mmap(fd, READY_WORD.size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def _ready_bytes(self) -> int:
        ready = READY_WORD.unpack_from(self._ready, 0)[0]
        if ready == READY_FAILED:
            raise OSError(f"reading the checkpoint into {self.segment.shm_name} failed")
        return ready

    def rank_view(self, rank: int) -> SegmentWeights:
        """The span of tensor-parallel rank `rank`, sharing this mapping and its registration
        (closing this object closes both)."""
        shard = self.segment.ranks[rank]
        view = copy.copy(self)
        view.rank, view.base, view.size, view.entries = (
            rank,
            shard.offset,
            shard.size,
            shard.tensors,
        )
        view.__dict__.pop("dtypes", None)
        view.__dict__.pop("layout", None)
        return view

    def wait_ready(self) -> None:
        while self._ready_bytes() < self.base + self.size:
            time.sleep(READY_POLL_S)

    @property
    def asynchronous_copy(self) -> bool:
        """Whether copy_into only issues its copies (registered memory, every byte read): else
        it returns once the bytes are on the device."""
        return self.registered and self._ready_bytes() >= self.base + self.size

    def copy_into(self, arena: torch.Tensor) -> None:
        """Copies the bytes this object stands for into `arena` (as many), chasing the disk
        reads of a segment still being filled (a load from disk overlaps its reads and its
        device copies)."""
        copied, end = self.base, self.base + self.size
        while copied < end:
            ready = min(self._ready_bytes(), end)
            if ready <= copied:
                time.sleep(READY_POLL_S)
                continue
            arena[copied - self.base : ready - self.base].copy_(
                self.buffer[copied:ready], non_blocking=self.registered
            )
            copied = ready

    def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        """Puts `tensor`'s bytes where `entry` says (a rank writing its shard)."""
        start = self.base + entry.offset
        self.buffer[start : start + entry.nbytes].copy_(tensor.reshape(-1).view(torch.uint8))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        self.wait_ready()
        base = self.buffer[self.base : self.base + self.size]
        return [(entry.name, self._view(base, entry)) for entry in self.entries]

    def views_into(self, arena: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors as views of `arena`, a same-size copy of the bytes this object stands
        for (two view operations a tensor: this runs on the swap path)."""
        typed = {dtype: arena.view(getattr(torch, dtype)) for dtype in self.dtypes}
        views = {}
        for entry in self.entries:
            flat = typed[entry.dtype]
            start = entry.offset // flat.element_size()
            count = entry.nbytes // flat.element_size()
            views[entry.name] = flat[start : start + count].view(entry.shape)
        return views

    @staticmethod
    def _view(base: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
        raw = base[entry.offset : entry.offset + entry.nbytes]
        return raw.view(getattr(torch, entry.dtype)).view(entry.shape)

    @functools.cached_property
    def dtypes(self) -> set[str]:
        return {entry.dtype for entry in self.entries}

    @functools.cached_property
    def layout(self) -> tuple:
        """Where every tensor lies: segments with equal layouts bind to a model the same way."""
        return tuple(
            (entry.name, entry.dtype, tuple(entry.shape), entry.offset) for entry in self.entries
        )

    def register_for_dma(self) -> None:
        result = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.segment.size, 0)
        if int(result) != 0:
            raise RuntimeError(f"cudaHostRegister failed for {self.segment.shm_name}: {result}")
        self.registered = True

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False
        self.buffer = None
        self._ready.close()
        with contextlib.suppress(BufferError):
            self._mapping.close()  # views still alive keep the pages until they go

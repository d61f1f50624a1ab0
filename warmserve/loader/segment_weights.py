"""Worker side of the host weight store: a segment mapped into a worker process, as one byte
tensor and per-tensor views, registered for DMA on a GPU host."""

from __future__ import annotations

import contextlib
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
    """

    def __init__(self, segment: WeightSegment):
        self.segment = segment
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

    def wait_ready(self) -> None:
        while self._ready_bytes() < self.segment.size:
            time.sleep(READY_POLL_S)

    def copy_into(self, arena: torch.Tensor) -> None:
        """Copies the whole segment into `arena`, chasing the disk reads of a segment still
        being filled (a load from disk overlaps its reads and its device copies)."""
        copied = 0
        while copied < self.segment.size:
            ready = self._ready_bytes()
            if ready == copied:
                time.sleep(READY_POLL_S)
                continue
            arena[copied:ready].copy_(self.buffer[copied:ready], non_blocking=self.registered)
            copied = ready

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        self.wait_ready()
        return [(entry.name, self._view(self.buffer, entry)) for entry in self.segment.tensors]

    def views_into(self, arena: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors as views of `arena`, a same-size copy of the whole segment (two view
        operations a tensor: this runs on the swap path)."""
        typed = {dtype: arena.view(getattr(torch, dtype)) for dtype in self.dtypes}
        views = {}
        for entry in self.segment.tensors:
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
        return {entry.dtype for entry in self.segment.tensors}

    @functools.cached_property
    def layout(self) -> tuple:
        """Where every tensor lies: segments with equal layouts bind to a model the same way."""
        return tuple(
            (entry.name, entry.dtype, tuple(entry.shape), entry.offset)
            for entry in self.segment.tensors
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

"""The worker's KV pool: physical pages that the resident models' KV regions map as their caches
grow and hand back as they shrink or unload (the kvcached idea).

The pool may hold at most what the weights leave free: `usable_bytes` less every claim (a
resident model's weights and activation reserve, or a load making room). Pages a region hands
back stay in the pool, idle, so the next model's cache maps them without the driver; they go
back to the driver only when a claim needs their memory. When the pool is at its limit, a region
that must grow takes the unused tails of the other regions (never a block a sequence holds).

On a GPU with virtual memory management the pages are real (`cuda_vmm.DevicePages`); elsewhere
(CPU workers, CI) `HostPages` keeps the same accounting over an anonymous mapping that the OS
commits lazily, and an unmapped page's memory is handed back with madvise.

A region that goes (its model unloaded or evicted) hands its pages back at once but stays mapped
until the worker's next idle gap: unmapping costs the driver about 10 ms a GiB, which an
eviction would add to the first token of the model it makes room for. A page may be mapped at
two addresses at once (CUDA's virtual aliasing), so the next model maps it meanwhile; and no
page goes back to the driver while a retired range still maps it.
"""

from __future__ import annotations

import mmap
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from warmserve.engine import cuda_vmm

if TYPE_CHECKING:
    from warmserve.engine.kv_region import KVRegion

MIB = 2**20
# A cache grows by at least this much (or an eighth of its size) at a time, so that growing is
# rare: each growth maps pages into every layer's K and V range.
MIN_GROW_BYTES = 64 * MIB
# The CPU twin's page: small enough that the tiny test models grow and shrink page by page.
HOST_PAGE_BYTES = 64 * 1024
# Python's mmap module does not export it; the value is Linux's (no swap space is set aside for
# a range that is mostly never touched).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


class InsufficientMemory(RuntimeError):
    pass


class Reservation(Protocol):
    tensor: torch.Tensor  # uint8 over the whole range

    def map(self, offset: int, handles: list[int]) -> None: ...

    def unmap(self, offset: int, num_pages: int) -> None: ...

    def free(self) -> None: ...


class Pages(Protocol):
    page_bytes: int
    # Whether a page may be mapped in a new range while a retired one still maps it.
    aliases: bool

    def create(self) -> int | None: ...

    def release(self, handle: int) -> None: ...

    def reserve(self, nbytes: int) -> Reservation: ...


class HostReservation:
    def __init__(self, nbytes: int, page_bytes: int):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        self.buffer = mmap.mmap(-1, nbytes, flags=flags)
        self.page_bytes = page_bytes
        self.tensor = torch.frombuffer(self.buffer, dtype=torch.uint8)

    def map(self, offset: int, handles: list[int]) -> None:
        """Nothing to do: the OS commits a page when it is first written."""

    def unmap(self, offset: int, num_pages: int) -> None:
        self.buffer.madvise(mmap.MADV_DONTNEED, offset, num_pages * self.page_bytes)

    def free(self) -> None:
        """The mapping goes with the last tensor viewing it."""
        self.tensor = None


class HostPages:
    """Page accounting without a device: a page is a number."""

    aliases = True  # each range has its own memory; a page number is accounting only

    def __init__(self, page_bytes: int = HOST_PAGE_BYTES):
        self.page_bytes = page_bytes
        self.created = 0

    def create(self) -> int:
        self.created += 1
        return self.created

    def release(self, handle: int) -> None:
        """Nothing to hand back: the region's unmap already returned the memory."""

    def reserve(self, nbytes: int) -> HostReservation:
        return HostReservation(nbytes, self.page_bytes)


class DeviceReservation:
    def __init__(self, pages: cuda_vmm.DevicePages, nbytes: int):
        self.pages = pages
        self.nbytes = nbytes
        self.address = pages.reserve_range(nbytes)
        self._tensor: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """Made on first use, once the range's first page is mapped: torch asks the driver
        which device the address is on, which an unmapped address cannot say."""
        if self._tensor is None:
            self._tensor = cuda_vmm.tensor_at(self.address, self.nbytes, self.pages.device)
        return self._tensor

    def map(self, offset: int, handles: list[int]) -> None:
        self.pages.map(self.address + offset, handles)

    def unmap(self, offset: int, num_pages: int) -> None:
        self.pages.unmap(self.address + offset, num_pages)

    def free(self) -> None:
        self._tensor = None
        self.pages.free_reservation(self.address, self.nbytes)


class DeviceReservingPages(cuda_vmm.DevicePages):
    aliases = True

    def reserve(self, nbytes: int) -> DeviceReservation:
        return DeviceReservation(self, nbytes)


class AllocatedReservation(HostReservation):
    """A GPU without virtual memory management: the whole range is allocated up front, and
    the pool's pages are accounting only."""

    def __init__(self, nbytes: int, device: torch.device):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def unmap(self, offset: int, num_pages: int) -> None:
        """The memory stays allocated until the model goes."""


class AllocatingPages(HostPages):
    aliases = False  # a retired range keeps its whole allocation: it goes at once

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def reserve(self, nbytes: int) -> AllocatedReservation:  # type: ignore[override]
        return AllocatedReservation(nbytes, self.device)


def pages_for(device: torch.device) -> Pages:
    if device.type != "cuda":
        return HostPages()
    if cuda_vmm.available(device):
        try:
            return DeviceReservingPages(device)
        except cuda_vmm.CudaDriverError as error:  # a driver that refuses the allocation type
            warnings.warn(f"KV pool without virtual memory management: {error}", stacklevel=2)
    return AllocatingPages(device)


class KVPool:
    def __init__(
        self,
        pages: Pages,
        usable_bytes: int | None = None,
        min_grow_bytes: int = MIN_GROW_BYTES,
        device_room: Callable[[], int] | None = None,
    ):
        """`usable_bytes` None: no limit but the device's own (an engine built alone).
        `device_room()` is what the device may still give (the driver's free memory less what
        warmserve leaves to others): new pages never eat into the rest."""
        self.pages = pages
        self.device_room = device_room
        self.page_bytes = pages.page_bytes
        self.usable_bytes = usable_bytes
        self.min_grow_bytes = min_grow_bytes
        self.claims: dict[object, int] = {}
        self.idle: list[int] = []
        self.mapped_pages = 0
        self.regions: list[KVRegion] = []
        # Ranges of regions that went, still mapped: (reservation, [(offset, pages)]).
        self.retiring: list[tuple[Reservation, list[tuple[int, int]]]] = []

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        usable_bytes: int | None = None,
        device_room: Callable[[], int] | None = None,
    ) -> KVPool:
        return cls(pages_for(device), usable_bytes, device_room=device_room)

    # ---- what the pool may hold -----------------------------------------------------------

    @property
    def total_pages(self) -> int:
        return self.mapped_pages + len(self.idle)

    @property
    def limit_pages(self) -> int | None:
        if self.usable_bytes is None:
            return None
        return max(0, self.usable_bytes - sum(self.claims.values())) // self.page_bytes

    @property
    def free_bytes(self) -> int | None:
        """What the caches may still map without taking from each other (None: no limit)."""
        limit = self.limit_pages
        return None if limit is None else max(0, limit - self.mapped_pages) * self.page_bytes

    def set_usable(self, usable_bytes: int) -> bool:
        self.usable_bytes = usable_bytes
        return self.fit()

    def claim(self, owner: object, nbytes: int) -> bool:
        """Sets aside `nbytes` outside the pool (a model's weights and activations), taking them
        from idle pages and then from the regions' unused tails; False if the regions' blocks
        in use leave too little (the claim stands: the caller drops it)."""
        self.claims[owner] = nbytes
        return self.fit()

    def drop_claim(self, owner: object) -> None:
        self.claims.pop(owner, None)

    def fit(self) -> bool:
        """Brings the pool within its limit: idle pages to the driver first, then the unused
        tails of the regions."""
        limit = self.limit_pages
        if limit is None:
            return True
        self._release_idle(self.total_pages - limit)
        if self.total_pages > limit:
            self._reclaim(self.total_pages - limit, requester=None)
            self._release_idle(self.total_pages - limit)
        return self.total_pages <= limit

    def _release_idle(self, count: int) -> None:
        count = max(0, min(count, len(self.idle)))
        if count and self.retiring:  # a page still mapped there would keep its memory
            self.finish_retired()
        for _ in range(count):
            self.pages.release(self.idle.pop())

    def _reclaim(self, count: int, requester: KVRegion | None) -> None:
        others = [region for region in self.regions if region is not requester]
        for region in sorted(others, key=lambda region: -region.reclaimable_pages()):
            if count <= 0:
                return
            count -= region.reclaim(count)

    # ---- pages for the regions ------------------------------------------------------------

    def take(self, count: int, requester: KVRegion) -> list[int] | None:
        """`count` pages to map (all or none): idle ones, new ones within the limit, then ones
        reclaimed from the other regions' unused tails."""
        limit = self.limit_pages
        if limit is not None and self.mapped_pages + count > limit:
            self._reclaim(self.mapped_pages + count - limit, requester)
            if self.mapped_pages + count > limit:
                return None
        new_bytes = (count - len(self.idle)) * self.page_bytes
        if new_bytes > 0 and self.device_room is not None and self.device_room() < new_bytes:
            return None
        handles = [self.idle.pop() for _ in range(min(count, len(self.idle)))]
        while len(handles) < count:
            handle = self.pages.create()
            if handle is None:  # the device is out of memory whatever the ledger says
                self.idle.extend(handles)
                return None
            handles.append(handle)
        self.mapped_pages += count
        if limit is not None:  # new pages above may have left idle ones beyond the limit
            self._release_idle(self.total_pages - limit)
        return handles

    def give_back(self, handles: list[int]) -> None:
        self.mapped_pages -= len(handles)
        self.idle.extend(handles)
        limit = self.limit_pages
        if limit is not None:
            self._release_idle(self.total_pages - limit)

    def release_all_idle(self) -> None:
        self._release_idle(len(self.idle))

    # ---- regions that went ----------------------------------------------------------------

    def retire(
        self, reservation: Reservation, spans: list[tuple[int, int]], handles: list[int]
    ) -> None:
        """A region's range that no kernel reads any more, mapped at `spans` ((offset, pages)
        each): its pages are the pool's again at once; the range is unmapped and freed in the
        worker's next idle gap (finish_retired), or before a page goes back to the driver."""
        self.retiring.append((reservation, spans))
        if not self.pages.aliases:
            self.finish_retired()
        self.give_back(handles)

    def finish_retired(self) -> None:
        while self.retiring:
            reservation, spans = self.retiring.pop()
            for offset, num_pages in spans:
                reservation.unmap(offset, num_pages)
            reservation.free()

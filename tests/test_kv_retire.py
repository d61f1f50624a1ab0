"""A KV region that goes hands its pages back to the pool at once and stays mapped until the
worker's next idle gap (engine/kv_pool.py): unmapping is the slow part of an eviction. Pages and
ranges here record what the driver would be asked, in order."""

from __future__ import annotations

import torch

from warmserve.engine.kv_pool import HostPages, HostReservation, KVPool
from warmserve.engine.kv_region import KVRegion

PAGE = 4096


class RecordingReservation(HostReservation):
    def __init__(self, nbytes: int, page_bytes: int, calls: list, name: str):
        super().__init__(nbytes, page_bytes)
        self.calls, self.name = calls, name

    def unmap(self, offset: int, num_pages: int) -> None:
        self.calls.append(("unmap", self.name, offset, num_pages))
        super().unmap(offset, num_pages)

    def free(self) -> None:
        self.calls.append(("free", self.name))
        super().free()


class RecordingPages(HostPages):
    def __init__(self, aliases: bool = True):
        super().__init__(PAGE)
        self.aliases = aliases
        self.calls: list = []
        self.reserved = 0

    def release(self, handle: int) -> None:
        self.calls.append(("release", handle))

    def reserve(self, nbytes: int) -> RecordingReservation:
        self.reserved += 1
        return RecordingReservation(nbytes, PAGE, self.calls, f"range{self.reserved}")


def region(pool: KVPool, min_blocks: int = 4) -> KVRegion:
    """Two layers (four ranges), two 2 KiB blocks to a page row."""
    return KVRegion(
        pool,
        num_layers=2,
        block_size=16,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        max_blocks=64,
        min_blocks=min_blocks,
        device=torch.device("cpu"),
    )


def test_a_released_region_gives_its_pages_back_at_once_and_unmaps_in_the_idle_gap():
    pages = RecordingPages()
    pool = KVPool(pages, 64 * PAGE, min_grow_bytes=PAGE)
    first = region(pool)
    first.grow_to(6)  # three rows mapped in each of the four ranges
    assert (first.data_rows, pool.mapped_pages) == (3, 12)
    first.release()
    assert pool.mapped_pages == 0 and len(pool.idle) == 12
    assert pages.calls == [] and len(pool.retiring) == 1  # nothing unmapped yet
    second = region(pool)  # maps pages the retired range still maps
    assert pool.mapped_pages == second.mapped_bytes // PAGE and pages.created == 12
    pool.finish_retired()
    range_bytes = first.range_bytes
    assert pages.calls == [
        *[("unmap", "range1", index * range_bytes, 3) for index in range(4)],
        ("free", "range1"),
    ]
    assert pool.retiring == []
    second.release()
    pool.release_all_idle()  # the driver gets pages only once no retired range maps them
    unmapped = [i for i, call in enumerate(pages.calls) if call[0] == "unmap"]
    released = [i for i, call in enumerate(pages.calls) if call[0] == "release"]
    assert max(unmapped) < min(released) and pool.retiring == []


def test_without_aliasing_a_retired_range_goes_at_once():
    pages = RecordingPages(aliases=False)
    pool = KVPool(pages, 64 * PAGE, min_grow_bytes=PAGE)
    region(pool).release()
    assert pool.retiring == [] and ("free", "range1") in pages.calls

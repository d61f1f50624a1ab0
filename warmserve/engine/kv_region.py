"""One model's KV cache as a range of the worker's KV pool: a virtual reservation big enough for
the largest cache the model could ever have, with pool pages mapped where blocks are in use.

The layout is the cache's usual one, layer-major: each layer's K and V are a
[max_blocks, block_size, kv_heads, head_dim] tensor, each at its own page-aligned offset of the
reservation, so kernels see the same tensors as with one allocation, at one address for the
model's whole residency (CUDA graphs stay valid). Page row r is page r of every layer's K and V
range: growing maps the next rows (blocks at the end of every range), shrinking unmaps the last
ones; the first row is always mapped (it holds the scratch block, see engine.py).

A load takes the pages of the cache the model always keeps (`min_blocks`) from the pool at once,
so they are its own, but maps only the first row: mapping costs the driver some 40 us a page,
about 10 ms for 4,096 tokens of a 28-layer model, which a swap's first token would wait for. The
rest are mapped when the cache grows into them or in the worker's next idle gap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from warmserve.engine.kv_pool import InsufficientMemory, KVPool

if TYPE_CHECKING:
    from warmserve.engine.block_manager import BlockManager


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVRegion:
    def __init__(
        self,
        pool: KVPool,
        *,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_blocks: int,
        min_blocks: int,
        device: torch.device,
    ):
        self.pool = pool
        self.device = device
        self.max_blocks = max_blocks
        self.min_blocks = max(1, min(min_blocks, max_blocks))
        self.num_ranges = 2 * num_layers
        page = pool.page_bytes
        block_shape = (block_size, num_kv_heads, head_dim)
        self.range_block_bytes = block_size * num_kv_heads * head_dim * dtype.itemsize
        self.block_bytes = self.range_block_bytes * self.num_ranges
        self.num_rows = _ceil_div(max_blocks * self.range_block_bytes, page)
        self.range_bytes = self.num_rows * page
        self.block_manager: BlockManager | None = None
        self.reservation = pool.pages.reserve(self.num_ranges * self.range_bytes)
        # row -> its page in every range: rows [0, data_rows) mapped, the rest up to
        # len(row_pages) taken at load and not mapped yet.
        self.row_pages: dict[int, list[int]] = {}
        self.data_rows = 0
        self.layer_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        pool.regions.append(self)
        if not self._take_rows(range(0, self._rows_for(self.min_blocks))):
            free = pool.free_bytes or 0
            self.release()
            raise InsufficientMemory(
                f"the KV pool has {free / 2**20:.0f} MiB free; the model needs at least "
                f"{self.min_blocks * self.block_bytes / 2**20:.0f} MiB of KV cache"
            )
        self._map_rows(range(0, 1))
        self.data_rows = 1
        # The views come after the first pages are mapped (see DeviceReservation.tensor).
        flat = self.reservation.tensor.view(dtype)
        elements_per_range = self.range_bytes // dtype.itemsize
        strides = (block_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1)
        for layer in range(num_layers):
            k, v = (
                flat.as_strided(
                    (max_blocks, *block_shape), strides, (2 * layer + kv) * elements_per_range
                )
                for kv in (0, 1)
            )
            self.layer_caches.append((k, v))

    # ---- figures --------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """The blocks whose every byte is mapped."""
        return min(self.max_blocks, self.data_rows * self.pool.page_bytes // self.range_block_bytes)

    @property
    def mapped_bytes(self) -> int:
        """The bytes of the pool's pages that the region holds, mapped or not yet."""
        return len(self.row_pages) * self.num_ranges * self.pool.page_bytes

    @property
    def unmapped_rows(self) -> bool:
        """Rows taken at load are not mapped yet (see map_taken_rows)."""
        return len(self.row_pages) > self.data_rows

    @property
    def used_bytes(self) -> int:
        manager = self.block_manager
        return manager.num_used_blocks * self.block_bytes if manager is not None else 0

    @property
    def min_bytes(self) -> int:
        """What the region always keeps mapped."""
        return self._rows_for(self.min_blocks) * self.num_ranges * self.pool.page_bytes

    def _rows_for(self, blocks: int) -> int:
        return _ceil_div(
            min(blocks, self.max_blocks) * self.range_block_bytes, self.pool.page_bytes
        )

    # ---- growing and shrinking ------------------------------------------------------------

    def grow(self, blocks_missing: int) -> int:
        """Maps pages for at least `blocks_missing` more blocks, in a step large enough that
        growing stays rare (less when the pool has less); returns the block count."""
        current = self.num_blocks
        step_bytes = max(self.pool.min_grow_bytes, self.mapped_bytes // 8)
        wanted = current + max(blocks_missing, _ceil_div(step_bytes, self.block_bytes))
        if self.grow_to(wanted) >= current + blocks_missing:
            return self.num_blocks
        return self.grow_to(current + blocks_missing)

    def grow_to(self, blocks: int) -> int:
        target = self._rows_for(min(blocks, self.max_blocks))
        taken = min(target, len(self.row_pages))
        if taken > self.data_rows:  # pages taken at load come first
            self._map_rows(range(self.data_rows, taken))
            self.data_rows = taken
        if target > self.data_rows and self._take_rows(range(self.data_rows, target)):
            self._map_rows(range(self.data_rows, target))
            self.data_rows = target
        return self.num_blocks

    def map_taken_rows(self) -> None:
        """For an idle gap: maps the rows taken at load, and tells the block manager."""
        self.grow_to(len(self.row_pages) * self.pool.page_bytes // self.range_block_bytes)
        if self.block_manager is not None:
            self.block_manager.add_blocks(self.num_blocks)

    def _take_rows(self, rows: range) -> bool:
        if not rows:
            return True
        handles = self.pool.take(len(rows) * self.num_ranges, self)
        if handles is None:
            return False
        for index, row in enumerate(rows):
            self.row_pages[row] = handles[index * self.num_ranges : (index + 1) * self.num_ranges]
        return True

    def _map_rows(self, rows: range) -> None:
        page = self.pool.page_bytes
        for range_index in range(self.num_ranges):
            self.reservation.map(
                range_index * self.range_bytes + rows.start * page,
                [self.row_pages[row][range_index] for row in rows],
            )

    def reclaimable_pages(self) -> int:
        return max(0, self.data_rows - self._keep_rows()) * self.num_ranges

    def _keep_rows(self) -> int:
        in_use = self.block_manager.blocks_in_use_end() if self.block_manager else self.num_blocks
        return self._rows_for(max(self.min_blocks, in_use))

    def reclaim(self, pages_wanted: int) -> int:
        """Unmaps unused rows at the tail (blocks no sequence holds, cached prefixes dropped)
        until `pages_wanted` pages went back to the pool; returns how many did."""
        keep = max(self._keep_rows(), self.data_rows - _ceil_div(pages_wanted, self.num_ranges))
        return self.shrink_rows(keep)

    def shrink_rows(self, keep: int) -> int:
        if keep >= self.data_rows:
            return 0
        blocks = keep * self.pool.page_bytes // self.range_block_bytes
        if self.block_manager is not None:
            self.block_manager.shrink(blocks)
        self._synchronize()
        rows = range(keep, self.data_rows)
        self._unmap_rows(rows)
        self.data_rows = keep
        return len(rows) * self.num_ranges

    def _unmap_rows(self, rows: range) -> None:
        page = self.pool.page_bytes
        handles: list[int] = []
        for range_index in range(self.num_ranges):
            self.reservation.unmap(range_index * self.range_bytes + rows.start * page, len(rows))
        for row in rows:
            handles += self.row_pages.pop(row)
        self.pool.give_back(handles)

    def _synchronize(self) -> None:
        """Kernels still queued may write the rows about to go (a finished sequence's last
        step); unmapping under them would fault."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def release(self) -> None:
        """Hands every page back to the pool (not to the driver); the range is unmapped and
        freed later (KVPool.retire)."""
        self._synchronize()
        self.layer_caches = []
        # Rows [0, data_rows) of every layer's K and V range are mapped.
        spans = [(index * self.range_bytes, self.data_rows) for index in range(self.num_ranges)]
        spans = spans if self.data_rows else []
        handles = [handle for pages in self.row_pages.values() for handle in pages]
        self.row_pages.clear()
        self.data_rows = 0
        if self in self.pool.regions:
            self.pool.regions.remove(self)
        self.pool.retire(self.reservation, spans, handles)

"""The host weight stores as the controller uses them: one per node, since shared memory is
node-local. A load leases its model's segment on the node of its workers; a worker copies from
its own node's store only. Without a cluster there is one node, this host, and its store lives
in the server process (`LocalStores`); on a Ray cluster each node's store is an agent there
(`launchers/ray_stores.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmserve.controller.launchers.local import LOCAL_NODE
from warmserve.loader.checkpoint import Checkpoint
from warmserve.loader.weight_store import HostWeightStore
from warmserve.protocol import TensorEntry, WeightSegment


@dataclass
class Lease:
    """A model's segment on one node, kept from eviction until `release()`."""

    segment: WeightSegment | None  # None: no room in the store; the workers read the disk
    source: str  # "host-cache", or "disk" when the segment is (being) read from the checkpoint
    filled: Awaitable[None] | None  # completes when the disk read is done (None: it was)
    release: Callable[[], None]


class LocalStores:
    """This host's store, in the server process."""

    def __init__(self, capacity_bytes: int, instance: str, on_drop: Callable[[str, str], None]):
        self.store = HostWeightStore(
            capacity_bytes, instance, lambda shm_name: on_drop(LOCAL_NODE, shm_name)
        )

    async def lease(self, node: str, key: str, checkpoint: Checkpoint) -> Lease:
        """`key`'s segment (the checkpoint's resolved path), read from `checkpoint` if needed."""
        stored = await self.acquire(node, key)
        if stored is not None:
            return stored
        started = await asyncio.to_thread(self.store.begin_checkpoint, key, checkpoint)
        if started is None:
            return Lease(None, "disk", None, lambda: None)
        segment, fill = started
        # The workers start copying while the disk is still being read.
        filling = asyncio.ensure_future(asyncio.to_thread(fill))
        # Seen by whoever awaits it, or by the workers (ready word) if the load fails first.
        filling.add_done_callback(lambda task: task.cancelled() or task.exception())
        return Lease(segment, "disk", filling, lambda: self.store.release(key))

    async def acquire(self, node: str, key: str) -> Lease | None:
        """`key`'s segment if the store holds it (None: it does not)."""
        segment = self.store.acquire(key)
        if segment is None:
            return None
        return Lease(segment, "host-cache", None, lambda: self.store.release(key))

    async def begin_shards(
        self, node: str, key: str, layout: list[list[TensorEntry]]
    ) -> WeightSegment | None:
        """A new segment (acquired) with a span per rank, for the ranks to write (see
        HostWeightStore.begin_shards); None: no room."""
        return self.store.begin_shards(key, layout)

    async def finish_shards(self, node: str, key: str, written: bool) -> None:
        """The ranks have written their spans (or failed to: the segment goes); releases it."""
        self.store.finish_shards(key, written)
        self.store.release(key)

    def nodes_holding(self, key: str) -> set[str]:
        return {LOCAL_NODE} if key in self.store else set()

    def segments(self, node: str) -> list[WeightSegment]:
        return self.store.segments()

    def fill_progress(self, key: str) -> tuple[int, int] | None:
        return self.store.fill_progress(key)

    def keys(self) -> list[str]:
        return self.store.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.store

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    def close(self) -> None:
        self.store.close()

"""The host weight store: each model's weights in one shared-memory segment that any worker maps.

The controller owns the store and decides what stays (least recently used copies go first when
the byte budget is full). A segment holds the checkpoint's tensors in the order a forward pass
reads them, read from disk in large chunks by several threads; the manifest says where each
tensor lies. A tensor-parallel model's shards get a segment of their own, one contiguous span per
rank that the ranks write once after their first load (`begin_shards`), so that every later load
of that model is one copy per rank.
Workers map a segment read-only by name, so a model unloaded from one worker reloads on any other
without touching the disk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from warmserve.loader.checkpoint import Checkpoint
from warmserve.protocol import RankShard, TensorEntry, WeightSegment

SHM_DIR = "/dev/shm"
ALIGNMENT = 4096  # segment sizes: whole pages
TENSOR_ALIGNMENT = 256  # where a tensor (or a stack of neighbours) starts: what GEMMs like
READ_CHUNK_BYTES = 64 * 2**20
READ_THREADS = 4
READY_WORD = struct.Struct("<Q")
READY_FAILED = 2**64 - 1  # the fill failed: workers waiting on the segment give up
READY_POLL_S = 0.0005


@dataclass
class _Stored:
    segment: WeightSegment
    mapping: mmap.mmap
    ready: mmap.mmap  # the count of bytes in place, from the start (READY_WORD)
    in_use: int = 0
    last_used: float = 0.0


def _align(value: int) -> int:
    return -(-value // ALIGNMENT) * ALIGNMENT


class HostWeightStore:
    def __init__(self, capacity_bytes: int, instance: str, on_drop=None):
        self.capacity_bytes = capacity_bytes
        self.on_drop = on_drop  # called with the shm name of every segment the store drops
        self.instance = instance
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._lock = threading.Lock()
        self._counter = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.segment.size for entry in self._entries.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def segments(self) -> list[WeightSegment]:
        with self._lock:
            return [entry.segment for entry in self._entries.values()]

    def acquire(self, key: str) -> WeightSegment | None:
        """The stored segment for `key`, kept from eviction until `release(key)`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.in_use += 1
            entry.last_used = time.monotonic()
            self._entries.move_to_end(key)
            return entry.segment

    def fill_progress(self, key: str) -> tuple[int, int] | None:
        """(bytes in place, segment size) of the copy stored under `key`, while or after it is
        read from disk; None when there is none (or its fill failed)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            ready = READY_WORD.unpack_from(entry.ready, 0)[0]
            if ready == READY_FAILED:
                return None
            return min(ready, entry.segment.size), entry.segment.size

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.in_use -= 1

    def store_checkpoint(self, key: str, checkpoint: Checkpoint) -> WeightSegment | None:
        """Reads the checkpoint into a new segment and returns it acquired; None when it cannot
        fit in the budget even after evicting every unused copy."""
        started = self.begin_checkpoint(key, checkpoint)
        if started is None:
            return None
        segment, fill = started
        fill()
        return segment

    def begin_checkpoint(
        self, key: str, checkpoint: Checkpoint
    ) -> tuple[WeightSegment, Callable[[], None]] | None:
        """Creates the segment (acquired) and returns it with the function that fills it from
        disk. The segment can be handed to workers at once: its `.ready` word says how many
        bytes from the start are in place, so a worker copies to the GPU while the disk is
        still being read (None: no room, as for store_checkpoint)."""
        tensors, jobs, size = _layout(checkpoint)
        created = self._create_entry(key, size, tensors)
        if created is None:
            return None
        segment, mapping, ready = created

        def fill() -> None:
            try:
                _read_jobs(jobs, mapping, ready, size)
            except BaseException:
                READY_WORD.pack_into(ready, 0, READY_FAILED)
                self.evict(key)
                raise

        return segment, fill

    def begin_shards(self, key: str, shards: list[list[TensorEntry]]) -> WeightSegment | None:
        """A new segment (acquired) with one span per rank for the parameters each rank listed,
        for the ranks to write; `finish_shards` says when they have. None: no room."""
        ranks, cursor = [], 0
        for tensors in shards:
            size = max((entry.offset + entry.nbytes for entry in tensors), default=0)
            ranks.append(RankShard(cursor, size, tensors))
            cursor = _align(cursor + size)
        created = self._create_entry(key, cursor or ALIGNMENT, [], ranks)
        return created[0] if created is not None else None

    def _create_entry(
        self, key: str, size: int, tensors: list[TensorEntry], ranks: list[RankShard] | None = None
    ) -> tuple[WeightSegment, mmap.mmap, mmap.mmap] | None:
        """A new segment of `size` bytes under `key`, acquired, with its ready word, after
        making room; None when there is none."""
        with self._lock:
            if not self._make_room(size):
                return None
            self._counter += 1
            shm_name = f"warmserve-{self.instance}-{self._counter}"
        mapping = _create_shm(shm_name, size)
        ready = _create_shm(ready_name(shm_name), READY_WORD.size)
        segment = WeightSegment(shm_name=shm_name, size=size, tensors=tensors, ranks=ranks or [])
        with self._lock:
            self._entries[key] = _Stored(
                segment, mapping, ready, in_use=1, last_used=time.monotonic()
            )
        return segment, mapping, ready

    def finish_shards(self, key: str, written: bool) -> None:
        """The ranks have written their spans (or failed to: the segment goes)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            if written:
                READY_WORD.pack_into(entry.ready, 0, entry.segment.size)
            else:
                READY_WORD.pack_into(entry.ready, 0, READY_FAILED)
                self._drop(key)

    def _make_room(self, size: int) -> bool:
        if size > self.capacity_bytes:
            return False
        used = sum(entry.segment.size for entry in self._entries.values())
        for key in list(self._entries):
            if used + size <= self.capacity_bytes:
                break
            entry = self._entries[key]
            if entry.in_use == 0:
                used -= entry.segment.size
                self._drop(key)
        return used + size <= self.capacity_bytes

    def evict(self, key: str) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        with contextlib.suppress(BufferError):  # a fill still running keeps its view
            entry.mapping.close()
        entry.ready.close()
        # Workers that still map the segment keep their mapping; the name goes now.
        _unlink(entry.segment.shm_name)
        _unlink(ready_name(entry.segment.shm_name))
        if self.on_drop is not None:
            self.on_drop(entry.segment.shm_name)

    def close(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)


def _create_shm(name: str, size: int) -> mmap.mmap:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


# Projections that models stack into one matrix product, in stack order: the store puts each
# group side by side, so that the stacked weight is one view of the device copy.
STACKED_NEIGHBOURS = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
}


def forward_order(name: str) -> tuple:
    """Sort key of a checkpoint tensor in the segment: the order a forward pass reads them
    (embeddings, then layer by layer in numeric order, the output head last), with stacked
    neighbours side by side; a load's copy then lands the first layers first."""
    parts = name.split(".")
    module, attribute = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
    key: list[tuple] = [(int(parts[0] == "lm_head"), 0, "")]
    key += [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts[:-2]]
    group, index = STACKED_NEIGHBOURS.get(module, (module, 0))
    return (*key, (1, 0, group), (1, 0, attribute), (0, index, ""))


def _layout(
    checkpoint: Checkpoint,
) -> tuple[list[TensorEntry], list[tuple[str, int, int, int]], int]:
    """Where each tensor lands in the segment (forward order), the reads that fill it in
    segment order, (file, file offset, segment offset, length), and the segment's size."""
    infos = sorted(checkpoint.tensors.values(), key=lambda info: forward_order(info.name))
    tensors, jobs = [], []
    cursor, previous_key = 0, None
    for info in infos:
        key = forward_order(info.name)
        neighbour = previous_key is not None and _same_stack(previous_key, key)
        if not neighbour:
            cursor = -(-cursor // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
        tensors.append(TensorEntry(info.name, info.dtype, list(info.shape), cursor, info.nbytes))
        for start in range(0, info.nbytes, READ_CHUNK_BYTES):
            length = min(READ_CHUNK_BYTES, info.nbytes - start)
            job = (info.file, info.offset + start, cursor + start, length)
            if jobs and _continues(jobs[-1], job):
                last = jobs.pop()
                job = (last[0], last[1], last[2], last[3] + length)
            jobs.append(job)
        cursor += info.nbytes
        previous_key = key
    return tensors, jobs, _align(cursor) or ALIGNMENT


def _same_stack(previous: tuple, key: tuple) -> bool:
    """Whether `key` is the next projection of the stack that `previous` belongs to."""
    return previous[:-1] == key[:-1] and previous[-1][1] + 1 == key[-1][1]


def _continues(last: tuple[str, int, int, int], job: tuple[str, int, int, int]) -> bool:
    """Whether `job` reads on from where `last` stopped, in the file and in the segment."""
    return (
        last[0] == job[0]
        and last[1] + last[3] == job[1]
        and last[2] + last[3] == job[2]
        and last[3] + job[3] <= READ_CHUNK_BYTES
    )


def _read_jobs(jobs, mapping: mmap.mmap, ready: mmap.mmap, size: int) -> None:
    """Several threads read the chunks; the ready word advances over the finished prefix."""
    target = memoryview(mapping)
    files = {job[0] for job in jobs}
    descriptors = {file: os.open(file, os.O_RDONLY) for file in files}
    done = [False] * len(jobs)
    prefix = 0
    lock = threading.Lock()

    def read(index: int) -> None:
        nonlocal prefix
        file, file_offset, segment_offset, length = jobs[index]
        view = target[segment_offset : segment_offset + length]
        while length:
            count = os.preadv(descriptors[file], [view], file_offset)
            if count == 0:
                raise OSError(f"{file}: unexpected end of file")
            view, file_offset, length = view[count:], file_offset + count, length - count
        with lock:
            done[index] = True
            while prefix < len(jobs) and done[prefix]:
                prefix += 1
            # Alignment padding counts as ready with the read before it.
            READY_WORD.pack_into(ready, 0, jobs[prefix][2] if prefix < len(jobs) else size)

    # Reads go in file order (the disk likes it sequential); the ready word still advances over
    # the segment's prefix (forward order), so a copy chasing it follows as the layers complete.
    in_file_order = sorted(range(len(jobs)), key=lambda index: jobs[index][:2])
    try:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read, in_file_order))
        READY_WORD.pack_into(ready, 0, size)
    finally:
        for fd in descriptors.values():
            os.close(fd)
        target.release()


def ready_name(shm_name: str) -> str:
    return f"{shm_name}.ready"

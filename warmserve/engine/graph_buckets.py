"""Which decode batch sizes have a CUDA graph, and which to capture next.

A model's decode graphs are captured one bucket at a time, smallest first, in the worker's idle
gaps (worker/residents.py), never in the middle of traffic nor on a swap's first-token path;
until its bucket is captured a decode batch runs eagerly. Device-free, so the schedule is tested
on the CPU; the capture itself is the callable given (engine/cuda_graphs.py on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class GraphBuckets:
    def __init__(self, max_seqs: int, capture: Callable[[int], None]):
        self.sizes = [size for size in BUCKETS if size < max_seqs] + [max_seqs]
        self.capture = capture
        self.captured: list[int] = []  # in capture order: ascending

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket that holds `batch` sequences."""
        return next((size for size in self.sizes if size >= batch), None)

    def replayable(self, batch: int) -> int | None:
        """The bucket to replay for `batch` sequences, None until it is captured."""
        bucket = self.bucket(batch)
        return bucket if bucket in self.captured else None

    @property
    def pending(self) -> bool:
        return len(self.captured) < len(self.sizes)

    @property
    def next_size(self) -> int | None:
        return self.sizes[len(self.captured)] if self.pending else None

    def capture_next(self) -> int:
        """Captures the smallest bucket not captured yet; returns it. After a failed capture no
        other is tried: larger batches run eagerly."""
        bucket = self.sizes[len(self.captured)]
        try:
            self.capture(bucket)
        except BaseException:
            self.sizes = list(self.captured)
            raise
        self.captured.append(bucket)
        return bucket

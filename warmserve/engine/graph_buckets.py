"""Which step sizes have a CUDA graph, and which to capture next: decode batch sizes
(engine/cuda_graphs.py), or the token counts of steps that carry prompt tokens
(engine/mixed_graphs.py).

A model's graphs are captured one bucket at a time, smallest first, in the worker's idle
gaps (worker/residents.py), never on a swap's first-token path; until its bucket is captured a
decode batch runs eagerly. A model under steady traffic has no idle gap: once a batch size has
run eagerly `OVERDUE_EAGER_STEPS` times, its bucket is captured between two steps (one
capture's stall, instead of every later step at eager speed, some three times slower for an 8B
model). Device-free, so the schedule is tested on the CPU; the capture itself is the callable
given (engine/cuda_graphs.py on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
OVERDUE_EAGER_STEPS = 32


class GraphBuckets:
    def __init__(
        self, max_size: int, capture: Callable[[int], None], sizes: tuple[int, ...] = BUCKETS
    ):
        """Buckets of `sizes` below `max_size`, and `max_size` itself."""
        self.sizes = [size for size in sizes if size < max_size] + [max_size]
        self.capture = capture
        self.captured: list[int] = []  # in capture order
        self.eager_steps: dict[int, int] = {}  # by bucket not captured yet

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket that holds `batch` (sequences, or tokens)."""
        return next((size for size in self.sizes if size >= batch), None)

    def replayable(self, batch: int) -> int | None:
        """The bucket to replay for `batch`, None until it is captured."""
        bucket = self.bucket(batch)
        return bucket if bucket in self.captured else None

    @property
    def pending(self) -> bool:
        return len(self.captured) < len(self.sizes)

    @property
    def next_size(self) -> int | None:
        return next((size for size in self.sizes if size not in self.captured), None)

    def note_eager(self, batch: int) -> None:
        """A step of size `batch` ran eagerly, its bucket not captured yet."""
        bucket = self.bucket(batch)
        if bucket is not None:
            self.eager_steps[bucket] = self.eager_steps.get(bucket, 0) + 1

    def overdue(self) -> int | None:
        """The smallest bucket that ran eagerly too often to wait for an idle gap."""
        due = [b for b, steps in self.eager_steps.items() if steps >= OVERDUE_EAGER_STEPS]
        return min(due, default=None)

    def capture_next(self) -> int:
        """Captures the smallest bucket not captured yet; returns it."""
        return self.capture_bucket(self.next_size)

    def capture_bucket(self, bucket: int) -> int:
        """After a failed capture no other is tried: batches without a graph run eagerly."""
        try:
            self.capture(bucket)
        except BaseException:
            self.sizes = list(self.captured)
            self.eager_steps.clear()
            raise
        self.captured.append(bucket)
        self.eager_steps.pop(bucket, None)
        return bucket

"""Histograms in plain Python, Prometheus style (counts per upper bound, the last one +Inf, and
the sum), one per label set: the controller counts with them and the gateway's collectors
render them at scrape time."""

from __future__ import annotations

import bisect


class Histograms:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts: dict[tuple[str, ...], list[int]] = {}  # per bucket, not cumulative
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

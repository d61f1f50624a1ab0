"""Which resident model a worker steps next: the one with the least weighted device time.

Each model keeps a virtual clock that advances by its steps' duration divided by its weight. A
model that had nothing to do neither banks time nor carries debt: when it becomes busy again its
clock starts at the earliest clock among the busy ones, so it cannot then hold the device for as
long as it was idle, nor wait while the others make up for a long step it took before (a first
step that waited for its load's copy). Pure Python: tested without devices.
"""

from __future__ import annotations


class FairShare:
    def __init__(self) -> None:
        self._clock: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._busy: set[str] = set()

    def add(self, key: str, weight: float = 1.0) -> None:
        if weight <= 0:
            raise ValueError("a weight must be positive")
        self._clock[key] = min(self._clock.values(), default=0.0)
        self._weight[key] = weight

    def remove(self, key: str) -> None:
        self._clock.pop(key, None)
        self._weight.pop(key, None)
        self._busy.discard(key)

    def pick(self, busy: list[str]) -> str:
        """The next model to step among `busy` (not empty)."""
        woken = [key for key in busy if key not in self._busy]
        if woken:
            running = [self._clock[key] for key in self._busy if key in busy]
            floor = min(running, default=min(self._clock[key] for key in busy))
            for key in woken:
                self._clock[key] = floor
        self._busy = set(busy)
        return min(busy, key=lambda key: self._clock[key])

    def charge(self, key: str, seconds: float) -> None:
        if key in self._clock:
            self._clock[key] += seconds / self._weight[key]

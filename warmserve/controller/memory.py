"""The controller's ledger of each worker's memory: what models may use there, what each
resident (or loading) model holds, and what the worker last measured as free.

A worker's free memory is the smaller of two figures: the ledger's (usable less every holding)
and the worker's own measurement less the holdings it has not counted yet (loads under way).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Holding:
    bytes: int
    counted_by_worker: bool = False  # the worker's measurement already includes it


@dataclass
class WorkerMemory:
    usable_bytes: int = 0
    measured_free_bytes: int = 0
    holdings: dict[str, Holding] = field(default_factory=dict)  # deployment id -> holding

    @property
    def held_bytes(self) -> int:
        return sum(holding.bytes for holding in self.holdings.values())

    @property
    def free_bytes(self) -> int:
        uncounted = sum(h.bytes for h in self.holdings.values() if not h.counted_by_worker)
        return max(
            0, min(self.usable_bytes - self.held_bytes, self.measured_free_bytes - uncounted)
        )


class MemoryLedger:
    def __init__(self) -> None:
        self.workers: dict[int, WorkerMemory] = {}

    def worker_ready(self, worker_id: int, usable_bytes: int) -> None:
        """A (new) worker process: nothing is resident in it."""
        self.workers[worker_id] = WorkerMemory(usable_bytes, usable_bytes)

    def worker_gone(self, worker_id: int) -> None:
        self.workers.pop(worker_id, None)

    def measured(self, worker_id: int, free_bytes: int) -> None:
        memory = self.workers.get(worker_id)
        if memory is not None:
            memory.measured_free_bytes = free_bytes

    def hold(self, worker_id: int, deployment_id: str, nbytes: int) -> None:
        """Reserves memory for a model about to be built there."""
        self.workers[worker_id].holdings[deployment_id] = Holding(nbytes)

    def settle(self, worker_id: int, deployment_id: str, nbytes: int) -> None:
        """The worker built the model and measured after it: the holding is what it reported."""
        memory = self.workers.get(worker_id)
        if memory is not None and deployment_id in memory.holdings:
            memory.holdings[deployment_id] = Holding(nbytes, counted_by_worker=True)

    def release(self, worker_id: int, deployment_id: str) -> None:
        memory = self.workers.get(worker_id)
        if memory is not None:
            memory.holdings.pop(deployment_id, None)

    def free(self, worker_id: int) -> int:
        memory = self.workers.get(worker_id)
        return memory.free_bytes if memory is not None else 0

    def usable(self, worker_id: int) -> int:
        memory = self.workers.get(worker_id)
        return memory.usable_bytes if memory is not None else 0

    def held(self, worker_id: int, deployment_id: str) -> int:
        memory = self.workers.get(worker_id)
        holding = memory.holdings.get(deployment_id) if memory is not None else None
        return holding.bytes if holding is not None else 0

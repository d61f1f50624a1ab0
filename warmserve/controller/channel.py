"""Commands to workers that wait for a reply: each gets an id, the worker's CommandDone resolves
it, and a worker that dies fails every command it still owes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warmserve.controller.errors import (
    CheckpointInvalid,
    ControllerError,
    InvalidRequest,
    LoadFailed,
    ModelUnavailable,
    NoCapacity,
)
from warmserve.controller.pool import WorkerHandle, WorkerPool
from warmserve.protocol import CommandDone, ErrorKind


class WorkerDied(Exception):
    pass


class CommandChannel:
    def __init__(self, pool: WorkerPool, timeout_s: float):
        self.pool = pool
        self.timeout_s = timeout_s
        self._pending: dict[tuple[int, int], asyncio.Future] = {}
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def command(
        self, handles: list[WorkerHandle], build: Callable[[int, int], object]
    ) -> list[CommandDone | BaseException]:
        """Sends one command to each worker (built from its rank and command id) and waits for
        every reply (or the WorkerDied of a worker that is gone)."""
        loop = asyncio.get_running_loop()
        keys, futures = [], []
        for rank, handle in enumerate(handles):
            command_id = self.next_id()
            future = loop.create_future()
            if not self.pool.is_current(handle):
                future.set_exception(WorkerDied(f"worker {handle.id} died"))
            else:
                self._pending[(handle.id, command_id)] = future
                keys.append((handle.id, command_id))
                self.pool.send_to(handle, build(rank, command_id))
            futures.append(future)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.timeout_s
            )
        except TimeoutError:
            workers = [handle.id for handle in handles]
            raise LoadFailed(
                f"workers {workers} did not answer within {self.timeout_s:.0f} s"
            ) from None
        finally:
            for key in keys:
                self._pending.pop(key, None)

    def resolve(self, reply: CommandDone) -> None:
        future = self._pending.pop((reply.worker_id, reply.command_id), None)
        if future is not None and not future.done():
            future.set_result(reply)

    def worker_died(self, worker_id: int) -> None:
        for (owner, _), future in list(self._pending.items()):
            if owner == worker_id and not future.done():
                future.set_exception(WorkerDied(f"worker {worker_id} died"))

    def cancel_all(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()


def load_error(reply) -> ControllerError:
    """The controller's error for a worker's failed (or missing) reply to a load."""
    if isinstance(reply, WorkerDied):
        return ModelUnavailable(f"{reply} while loading")
    if isinstance(reply, BaseException):
        return LoadFailed(str(reply))
    if reply.error_kind == ErrorKind.CHECKPOINT:
        return CheckpointInvalid(reply.error)
    if reply.error_kind == ErrorKind.INSUFFICIENT_MEMORY:
        return NoCapacity(reply.error)
    if reply.error_kind == ErrorKind.INVALID:
        return InvalidRequest(reply.error)
    return LoadFailed(reply.error or "the worker could not build the model")

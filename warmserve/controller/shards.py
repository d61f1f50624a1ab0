"""Tensor-parallel shards in the host store: after a model's first load on several workers,
which slices the checkpoint's tensors rank by rank, each rank writes its parameters into a span
of a new segment (contiguous, in forward order), so that every later load of that model is one
copy per rank, as a single-worker load is one copy."""

from __future__ import annotations

import logging

from warmserve.controller.channel import CommandChannel
from warmserve.controller.deployment import Deployment
from warmserve.controller.errors import ControllerError
from warmserve.controller.pool import WorkerPool
from warmserve.loader.weight_store import HostWeightStore
from warmserve.protocol import CommandDone, RegisterSegment, StoreShard, TensorEntry

log = logging.getLogger("warmserve.controller")


def shard_key(deployment: Deployment) -> str | None:
    """The host store's key for a tensor-parallel model's shards (None for one worker): they
    hold the parameters in the dtype they were loaded in, sliced for that many ranks."""
    tp = deployment.tensor_parallel_size
    if tp == 1:
        return None
    return f"{deployment.path}#tp={tp},dtype={deployment.dtype}"


async def store_shards(
    store: HostWeightStore,
    channel: CommandChannel,
    pool: WorkerPool,
    deployment: Deployment,
    shards: list[list[TensorEntry]],
) -> None:
    """Has each rank of a loaded model write its parameters (laid out as `shards` says) into
    its span of a new segment. Best effort: without room, or if a rank fails, loads keep
    slicing."""
    key = shard_key(deployment)
    segment = store.begin_shards(key, shards)
    if segment is None:
        return
    written = False
    try:
        replies = await channel.command(
            deployment.handles,
            lambda rank, command_id: StoreShard(command_id, deployment.id, segment, rank),
        )
        written = all(isinstance(r, CommandDone) and not r.error for r in replies)
        if not written:
            log.warning("the ranks of %s did not store their shards: %s", key, replies)
    except ControllerError as exc:  # the workers did not answer in time
        log.warning("the ranks of %s did not store their shards: %s", key, exc)
    finally:
        store.finish_shards(key, written)
        store.release(key)
    if written:
        pool.broadcast(RegisterSegment(segment))

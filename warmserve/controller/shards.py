"""Tensor-parallel shards in the host stores: after a model's first load on several workers,
which slices the checkpoint's tensors rank by rank, each rank writes its parameters into a span
of a new segment (contiguous, in forward order), so that every later load of that model is one
copy per rank, as a single-worker load is one copy.

Shared memory is node-local, so the shards are kept per node: each node's store holds a segment
with the spans of the ranks on that node (the other ranks' spans empty), under a key that names
those ranks. A group within one node (the rule) has one such segment; a group that spans nodes
has one per node, and a later load uses them when its ranks land on the nodes as before."""

from __future__ import annotations

import logging

from warmserve.controller.channel import CommandChannel
from warmserve.controller.deployment import Deployment
from warmserve.controller.errors import ControllerError
from warmserve.controller.host_stores import Lease, LocalStores
from warmserve.controller.pool import WorkerPool
from warmserve.loader.checkpoint import Checkpoint
from warmserve.protocol import CommandDone, RegisterSegment, StoreShard, TensorEntry

log = logging.getLogger("warmserve.controller")


def ranks_by_node(deployment: Deployment) -> dict[str, list[int]]:
    """The ranks of the deployment on each node of its workers, the lead's node first."""
    nodes: dict[str, list[int]] = {}
    for rank, handle in enumerate(deployment.handles):
        nodes.setdefault(handle.node, []).append(rank)
    return nodes


def shard_key(deployment: Deployment, ranks: list[int]) -> str | None:
    """The host store's key for the shards of `ranks` of a tensor-parallel model (None for one
    worker): they hold the parameters in the dtype they were loaded in, sliced for that many
    ranks."""
    tp = deployment.tensor_parallel_size
    if tp == 1:
        return None
    held = ",".join(map(str, ranks))
    return f"{deployment.path}#tp={tp},dtype={deployment.dtype},ranks={held}"


async def lease_segments(
    stores: LocalStores, deployment: Deployment, checkpoint: Checkpoint
) -> dict[str, Lease]:
    """For each node of the deployment's workers, the segment its ranks copy from: the node's
    shards of those ranks when it holds them, else the checkpoint's tensors. What was leased
    is released if a lease fails."""
    leases: dict[str, Lease] = {}
    try:
        for node, ranks in ranks_by_node(deployment).items():
            key = shard_key(deployment, ranks)
            lease = await stores.acquire(node, key) if key is not None else None
            leases[node] = lease or await stores.lease(node, deployment.path, checkpoint)
    except BaseException:
        for lease in leases.values():
            lease.release()
        raise
    return leases


async def store_shards(
    stores: LocalStores,
    channel: CommandChannel,
    pool: WorkerPool,
    deployment: Deployment,
    shards: list[list[TensorEntry]],
) -> None:
    """Has each rank of a loaded model that sliced the checkpoint (its `shards` entry laid out,
    not empty) write its parameters into its span of a new segment on its node; a node whose
    ranks copied shards already is left as it is. Best effort: without room, or if a rank
    fails, loads keep slicing."""
    for node, ranks in ranks_by_node(deployment).items():
        if all(shards[rank] for rank in ranks):
            layout = [shards[rank] if rank in ranks else [] for rank in range(len(shards))]
            try:
                await _store_node_shards(stores, channel, pool, deployment, node, ranks, layout)
            except ControllerError as exc:  # the workers did not answer, or the node is gone
                log.warning("the ranks of %s did not store their shards: %s", deployment.name, exc)


async def _store_node_shards(
    stores: LocalStores,
    channel: CommandChannel,
    pool: WorkerPool,
    deployment: Deployment,
    node: str,
    ranks: list[int],
    layout: list[list[TensorEntry]],
) -> None:
    key = shard_key(deployment, ranks)
    segment = await stores.begin_shards(node, key, layout)
    if segment is None:
        return
    written = False
    try:
        replies = await channel.command(
            [deployment.handles[rank] for rank in ranks],
            lambda index, command_id: StoreShard(command_id, deployment.id, segment, ranks[index]),
        )
        written = all(isinstance(r, CommandDone) and not r.error for r in replies)
        if not written:
            log.warning("the ranks of %s did not store their shards: %s", key, replies)
    finally:
        await stores.finish_shards(node, key, written)
    if written:
        pool.broadcast(RegisterSegment(segment), node=node)

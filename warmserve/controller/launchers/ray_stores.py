"""The host weight stores of a Ray cluster: one `StoreAgent` actor per node, started on the first
lease there. The controller keeps what each node's store holds (from the leases' answers), so
placement can prefer a node that holds a model without asking the cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from warmserve.controller.errors import LoadFailed, ModelUnavailable
from warmserve.controller.host_stores import Lease
from warmserve.controller.launchers.ray_actors import StoreAgent
from warmserve.controller.launchers.ray_cluster import RayCluster
from warmserve.loader.checkpoint import Checkpoint
from warmserve.protocol import TensorEntry, WeightSegment

log = logging.getLogger("warmserve.controller")
# Leases and the waits for their reads run side by side in an agent.
AGENT_THREADS = 8


class RayStores:
    def __init__(
        self,
        cluster: RayCluster,
        capacity_bytes: int,
        on_drop: Callable[[str, str], None],
    ):
        self.cluster = cluster
        self.capacity_per_node = capacity_bytes
        self.on_drop = on_drop  # (node, shm name) of every segment a node's store dropped
        self.agents: dict[str, ray.actor.ActorHandle] = {}
        self.held: dict[str, dict[str, WeightSegment]] = {}  # node -> key -> segment
        self.filling: set[tuple[str, str]] = set()  # (node, key) still being read

    def _agent(self, node: str):
        agent = self.agents.get(node)
        if agent is None:
            agent = (
                ray.remote(StoreAgent)
                .options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                    num_cpus=0,
                    max_concurrency=AGENT_THREADS,
                )
                .remote(self.capacity_per_node)
            )
            self.agents[node] = agent
            self.held[node] = {}
        return agent

    async def lease(self, node: str, key: str, checkpoint: Checkpoint) -> Lease:
        """`key`'s segment in `node`'s store; the agent there reads the checkpoint (the same
        path on every node) when it holds no copy."""
        agent = self._agent(node)
        try:
            segment, source, dropped = await self._call(node, agent.lease, key, key)
        except ray.exceptions.RayTaskError as exc:  # the checkpoint is not readable there
            raise LoadFailed(f"node {node} cannot read {key}: {exc.cause}") from None
        self._dropped(node, dropped)
        if segment is None:
            return Lease(None, source, None, lambda: None)
        held = self.held[node]
        held[key] = segment
        filled = None
        if source == "disk":
            self.filling.add((node, key))
            filled = asyncio.ensure_future(self._filled(node, key, agent))
            filled.add_done_callback(lambda task: task.cancelled() or task.exception())
        return Lease(segment, source, filled, lambda: agent.release.remote(key))

    async def acquire(self, node: str, key: str) -> Lease | None:
        """`key`'s segment on `node` if its store holds it in full (None: it does not)."""
        if key not in self.held.get(node, {}) or (node, key) in self.filling:
            return None
        agent = self._agent(node)
        segment, dropped = await self._call(node, agent.acquire, key)
        self._dropped(node, dropped)
        if segment is None:  # dropped for room since the controller last heard
            self.held.get(node, {}).pop(key, None)
            return None
        return Lease(segment, "host-cache", None, lambda: agent.release.remote(key))

    async def begin_shards(
        self, node: str, key: str, layout: list[list[TensorEntry]]
    ) -> WeightSegment | None:
        """A new segment (acquired) on `node` for its ranks to write; None: no room."""
        segment, dropped = await self._call(node, self._agent(node).begin_shards, key, layout)
        self._dropped(node, dropped)
        if segment is not None:
            self.held[node][key] = segment
            self.filling.add((node, key))  # not leased until the ranks have written it
        return segment

    async def finish_shards(self, node: str, key: str, written: bool) -> None:
        """The ranks have written their spans (or failed to: the segment goes); releases it."""
        self.filling.discard((node, key))
        if not written:
            self.held.get(node, {}).pop(key, None)
        if node in self.agents:
            await self._call(node, self.agents[node].finish_shards, key, written)

    async def _call(self, node: str, method, *args):
        """A call to `node`'s agent; its node gone is the model's loss, not the server's."""
        try:
            return await method.remote(*args)
        except ray.exceptions.RayActorError:
            self._node_gone(node)
            raise ModelUnavailable(f"the host store of node {node} is gone") from None

    def _dropped(self, node: str, shm_names: list[str]) -> None:
        """Segments the node's store dropped to make room: they are no longer held there."""
        held = self.held.get(node, {})
        for shm_name in shm_names:
            for stored_key, stored in list(held.items()):
                if stored.shm_name == shm_name:
                    del held[stored_key]
            self.on_drop(node, shm_name)

    async def _filled(self, node: str, key: str, agent) -> None:
        try:
            await agent.filled.remote(key)
        except BaseException:
            self.held.get(node, {}).pop(key, None)
            raise
        finally:
            self.filling.discard((node, key))

    def _node_gone(self, node: str) -> None:
        self.agents.pop(node, None)
        self.held.pop(node, None)

    def nodes_holding(self, key: str) -> set[str]:
        for node in [node for node in self.held if not self.cluster.alive(node)]:
            self._node_gone(node)  # its store went with it
        return {
            node
            for node, held in self.held.items()
            if key in held and (node, key) not in self.filling
        }

    def segments(self, node: str) -> list[WeightSegment]:
        return list(self.held.get(node, {}).values())

    def fill_progress(self, key: str) -> tuple[int, int] | None:
        """Whole once a node holds it; 0 of its size while it is read (an agent's progress is
        not asked for: it would cost a call to the node per look)."""
        sizes = [
            (0 if (node, key) in self.filling else held[key].size, held[key].size)
            for node, held in self.held.items()
            if key in held
        ]
        return max(sizes, default=None)

    def keys(self) -> list[str]:
        return sorted({key for held in self.held.values() for key in held})

    def __contains__(self, key: str) -> bool:
        return any(key in held for held in self.held.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.size for held in self.held.values() for s in held.values())

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_per_node * max(1, len(self.agents))

    def close(self) -> None:
        """Removes every node's segments, then leaves the cluster."""
        closing = [agent.close.remote() for agent in self.agents.values()]
        try:
            ray.get(closing, timeout=10)
        except ray.exceptions.RayError as exc:
            log.warning("a node's host store did not close cleanly: %s", exc)
        for agent in self.agents.values():
            ray.kill(agent, no_restart=True)
        self.cluster.close()

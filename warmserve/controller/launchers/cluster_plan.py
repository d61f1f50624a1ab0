"""Which workers a Ray cluster's nodes take: one per GPU on every node, or on CPU `--workers N`
spread over the nodes in turn, each with its share of its node's cores. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.controller.devices import CPU_WORKERS
from warmserve.controller.launchers.base import WorkerSlot
from warmserve.controller.pool import StartupError


@dataclass(frozen=True)
class ClusterNode:
    id: str  # Ray's node id
    address: str  # the IP address Ray reaches it by
    gpus: int
    cpus: int


def cluster_device(nodes: list[ClusterNode], device: str) -> str:
    """`auto` is cuda when any node has a GPU."""
    if device == "auto":
        return "cuda" if any(node.gpus for node in nodes) else "cpu"
    if device not in ("cuda", "cpu"):
        raise StartupError(f"--device must be auto, cuda or cpu, not {device!r}")
    return device


def plan_workers(nodes: list[ClusterNode], device: str, workers: int | None) -> list[WorkerSlot]:
    """The workers to start, node by node (`nodes` in the order to fill them)."""
    if not nodes:
        raise StartupError("the Ray cluster has no live node")
    if device == "cuda":
        slots = [WorkerSlot("cuda:0", node.id) for node in nodes for _ in range(node.gpus)]
        if not slots:
            raise StartupError("--device cuda, but the Ray cluster has no GPU; use --device cpu")
        if workers is not None and workers > len(slots):
            raise StartupError(f"--workers {workers}, but the Ray cluster has {len(slots)} GPU(s)")
        return slots[:workers] if workers else slots
    count = workers or CPU_WORKERS
    placed = [nodes[index % len(nodes)] for index in range(count)]
    shares = {node.id: placed.count(node) for node in nodes}
    # Grouped by node, so that a node's workers have neighbouring ids (as a host's GPUs do).
    return [
        WorkerSlot("cpu", node.id, max(1, node.cpus // shares[node.id]))
        for node in nodes
        for _ in range(shares[node.id])
    ]


def joined_workers(node: ClusterNode, device: str) -> list[WorkerSlot]:
    """What a node that joins the cluster adds: its GPUs, or on CPU one worker with its cores."""
    if device == "cuda":
        return [WorkerSlot("cuda:0", node.id) for _ in range(node.gpus)]
    return [WorkerSlot("cpu", node.id, max(1, node.cpus))]

"""Where a server's workers and host stores live: on this host (child processes, one store in
the server process), or on the nodes of a Ray cluster (`--ray-address`; Ray is imported only
then)."""

from __future__ import annotations

from collections.abc import Callable

from warmserve.config import GIB, ServerConfig
from warmserve.controller.devices import local_slots
from warmserve.controller.host_stores import LocalStores
from warmserve.controller.launchers.base import Launcher
from warmserve.controller.launchers.local import LocalLauncher
from warmserve.controller.pool import StartupError


def host_stores(config: ServerConfig, instance: str, on_drop: Callable[[str, str], None]):
    """The host stores, and the Ray cluster they live on (None without one)."""
    capacity = int(config.host_cache_gb * GIB)
    if config.ray_address is None:
        return LocalStores(capacity, instance, on_drop), None
    try:
        from warmserve.controller.launchers.ray_cluster import RayCluster
        from warmserve.controller.launchers.ray_stores import RayStores
    except ImportError as exc:
        raise StartupError(
            f"--ray-address needs Ray ({exc}): pip install 'warmserve[ray]'"
        ) from None
    cluster = RayCluster(config.ray_address)
    return RayStores(cluster, capacity, on_drop), cluster


def make_launcher(config: ServerConfig, instance: str, cluster) -> Launcher:
    """Local worker processes, or worker actors on the cluster's nodes."""
    if cluster is None:
        slots = local_slots(config.device, config.workers)
        _check_batch_invariance(config, slots[0].device)
        return LocalLauncher(instance, slots)
    _check_batch_invariance(config, config.device)
    from warmserve.controller.launchers.ray_launcher import RayLauncher

    return RayLauncher(cluster, config.device, config.workers)


def _check_batch_invariance(config: ServerConfig, device: str) -> None:
    """At start-up rather than at each load (engine_build checks it there too)."""
    if config.engine.batch_invariant and device == "cpu":
        raise StartupError("--batch-invariant needs GPU workers: its kernels are Triton's")

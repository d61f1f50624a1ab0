"""The server's connection to a Ray cluster: joining it, and which nodes are alive."""

from __future__ import annotations

import logging
import signal
import threading

import ray

from warmserve.controller.launchers.cluster_plan import ClusterNode
from warmserve.controller.pool import StartupError

log = logging.getLogger("warmserve.controller")
# Actors, names and the server's objects are kept apart from other jobs on the cluster.
NAMESPACE = "warmserve"


class RayCluster:
    def __init__(self, address: str):
        self.address = address
        self.node_id = ""  # the node this server runs on
        self.ip = ""  # the address the other nodes reach this server by
        self._alive: set[str] = set()
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Joins the cluster. On the main thread: Ray's core worker installs its own SIGTERM
        handler, which aborts the process; the server's handlers (a clean stop) are put back."""
        handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StartupError(f"cannot join the Ray cluster at {self.address!r}: {exc}") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for number, handler in handlers.items():
                    if handler is not None:
                        signal.signal(number, handler)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ip = ray.util.get_node_ip_address()
        log.info(
            "joined the Ray cluster at %s from node %s (%s)", self.address, self.node_id, self.ip
        )

    def nodes(self) -> list[ClusterNode]:
        """The live nodes, this server's own first (its workers get the first ids)."""
        nodes = [
            ClusterNode(
                id=node["NodeID"],
                address=node["NodeManagerAddress"],
                gpus=int(node["Resources"].get("GPU", 0)),
                cpus=int(node["Resources"].get("CPU", 0)),
            )
            for node in ray.nodes()
            if node["Alive"]
        ]
        with self._lock:
            self._alive = {node.id for node in nodes}
        return sorted(nodes, key=lambda node: (node.id != self.node_id, node.id))

    def alive(self, node: str) -> bool:
        """As of the last look at the cluster (`nodes()`)."""
        with self._lock:
            return node in self._alive

    def close(self) -> None:
        ray.shutdown()

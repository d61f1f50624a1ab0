"""One tensor-parallel deployment's process group: formed at load on a store of its own (the
lead hosts it at the rendezvous address the controller picked), destroyed at unload. Never the
process-wide default group, so a worker can be in the groups of several models at once and hold
single-worker models beside them.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from warmserve.layers.parallel import TensorParallelGroup

# The other ranks join while they may still be finishing a step of another model.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
# A collective waits for the slowest rank, which may first finish a step of another model or a
# load from disk (synchronous, a minute for a large checkpoint on a slow disk).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class DeploymentGroup:
    def __init__(self, group: TensorParallelGroup, store: dist.Store):
        self.group = group
        self.store = store  # kept while the group lives: NCCL creates communicators through it

    @classmethod
    def form(cls, init_method: str, rank: int, size: int, device: torch.device) -> DeploymentGroup:
        """Blocks until every rank has joined; on a GPU the communicator exists on return, so a
        CUDA graph can capture the group's collectives."""
        address = urlsplit(init_method)
        store = dist.TCPStore(
            address.hostname, address.port, size, rank == 0, timeout=RENDEZVOUS_TIMEOUT
        )
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            process_group = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            process_group = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
        group = TensorParallelGroup(rank, size, process_group, device)
        # Creates the NCCL communicator now (it is made lazily, by the first collective).
        group.all_reduce(torch.zeros(1, device=device))
        return cls(group, store)

    def close(self, barrier: bool) -> None:
        """Leaves the group; with `barrier`, only once every rank is leaving too."""
        try:
            if barrier:
                self.group.barrier()
        finally:
            # NCCL's communicators hold device memory and a watchdog thread until shut down.
            shutdown = getattr(self.group.process_group, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.group.process_group = None
            self.store = None

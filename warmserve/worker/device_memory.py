"""A worker's device memory as warmserve sees it: how much models may use in all, how much is
taken, how much is free for the next model, and handing cached memory back to the driver."""

from __future__ import annotations

import torch


def release_cached_gpu_memory() -> None:
    """Returns the caching allocator's free blocks and cuBLAS's per-stream workspaces (the graph
    capture stream has its own) to the driver."""
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


class DeviceMemory:
    """On a GPU the figures come from the driver and the caching allocator; a CPU worker stands
    in for a GPU of `cap_bytes` and counts what its models take."""

    def __init__(self, device: torch.device, cap_bytes: int | None, utilization: float):
        self.device = device
        self.cap_bytes = cap_bytes
        self.utilization = utilization
        self.baseline_bytes = 0  # what the worker holds with no model (CUDA context, kernels)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def mark_baseline(self) -> None:
        self.baseline_bytes = self.used(0, 0)

    def total(self) -> int:
        if self.on_gpu:
            return torch.cuda.mem_get_info(self.device)[1]
        return self.cap_bytes or 0

    def usable(self) -> int:
        """What models may take on this worker, all of them together."""
        if not self.on_gpu:
            return self.cap_bytes or 0
        usable = int(self.total() * self.utilization) - self.baseline_bytes
        return max(0, min(usable, self.cap_bytes) if self.cap_bytes is not None else usable)

    def used(self, models_bytes: int, kv_pool_bytes: int) -> int:
        """What the worker holds: on a GPU what the caching allocator reserved (not what it
        allocated: what other processes can't use) and the KV pool's pages, which live outside
        the allocator; on a CPU what the models take."""
        if self.on_gpu:
            return torch.cuda.memory_reserved(self.device) + kv_pool_bytes
        return models_bytes

    def free(self, models_bytes: int, reclaimable_bytes: int = 0) -> int:
        """Free for another model: the ledger's figure (usable less what the resident models
        take), and on a GPU no more than the driver reports free (memory this process keeps
        cached counts as free: the next model reuses it, and so do the KV pool's idle pages
        and the caches' unused blocks, `reclaimable_bytes`)."""
        ledger = self.usable() - models_bytes
        if not self.on_gpu:
            return max(0, ledger)
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        measured = int(free + cached + reclaimable_bytes - (1.0 - self.utilization) * total)
        return max(0, min(ledger, measured))

    def room(self) -> int:
        """What the driver may still give this worker: its free memory less the share of the
        GPU warmserve leaves to others."""
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free - (1.0 - self.utilization) * total)

    def release(self, keep_nothing: bool) -> None:
        """Hands the caching allocator's unused memory to the driver (cuBLAS workspaces too when
        no model is resident)."""
        if not self.on_gpu:
            return
        if keep_nothing:
            release_cached_gpu_memory()
        else:
            torch.cuda.empty_cache()

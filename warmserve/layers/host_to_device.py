"""Host values that a step's kernels read (row indices, per-request parameters), copied to the
device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory, and CUDA makes such a copy
wait for everything queued on the stream before it. With asynchronous scheduling that is the
step in flight: the host would stop preparing the next step until the device is idle, and the
device would then wait for the rest of that preparation (a gap in every stream's tokens). A copy
from pinned memory is queued like a kernel instead; torch keeps the pinned buffer until the copy
has run.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, nested lists, or a CPU tensor) as a tensor on `device`, queued."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

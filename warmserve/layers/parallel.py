"""The tensor-parallel group a model's layers shard over.

Each tensor-parallel deployment has its own process group (formed at load, destroyed at unload),
never the process-wide default one, so a worker can hold several such models next to
single-worker ones. A model is built inside `building(group)`: its layers take the group's shape
and keep the group for their collectives.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class TensorParallelGroup:
    """This rank's place in one deployment's group, and the group's collectives (no-ops alone).
    `process_group` is a torch ProcessGroup built on the deployment's own store; `device` is
    where its collectives' tensors live."""

    def __init__(self, rank: int = 0, size: int = 1, process_group=None, device="cpu"):
        self.rank = rank
        self.size = size
        self.process_group = process_group
        self.device = torch.device(device)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.process_group.allreduce([tensor]).wait()
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.process_group.allgather([parts], [tensor.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value`: what the ranks size alike (the KV cache) when
        each had its own figure (the memory free on its worker)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.process_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def barrier(self) -> None:
        if self.size > 1:
            self.process_group.barrier().wait()


SINGLE = TensorParallelGroup()
_building = [SINGLE]


@contextlib.contextmanager
def building(group: TensorParallelGroup):
    """Layers constructed inside shard over `group`."""
    _building.append(group)
    try:
        yield
    finally:
        _building.pop()


def current_group() -> TensorParallelGroup:
    return _building[-1]


def set_group(model: torch.nn.Module, group: TensorParallelGroup) -> None:
    """Points a model's layers at `group`: a kept module tree, reused for a later load of the
    same shard, takes that load's group."""
    for module in model.modules():
        if isinstance(getattr(module, "group", None), TensorParallelGroup):
            module.group = group


def tp_world_size() -> int:
    return current_group().size


def tp_rank() -> int:
    return current_group().rank


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}"
        )
    return numerator // denominator

"""Linear layers sharded for tensor parallelism (Megatron style).

A sharded layer has a `weight_loader(param, loaded)` method that takes the full checkpoint tensor,
checks its shape and copies this rank's slice, so the model's loader never needs to know how a
layer is sharded. (A method of the layer, not an attribute of the parameter: a parameter that
pointed back at its layer would make a reference cycle, and an unloaded model would then wait for
the garbage collector to give its memory back.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.layers.parallel import current_group, divide


class ShapeMismatch(ValueError):
    pass


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ShapeMismatch(
            f"shape {tuple(loaded.shape)} in the checkpoint, the model expects {tuple(expected)}"
        )


def copy_full(param: nn.Parameter, loaded: torch.Tensor) -> None:
    check_shape(loaded, param.shape)
    param.data.copy_(loaded)


def project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch_invariant: bool
) -> torch.Tensor:
    """F.linear, or with `batch_invariant` the matmul whose rows do not depend on the batch."""
    if batch_invariant:
        from warmserve.layers.triton_matmul import invariant_linear  # triton: GPU hosts only

        return invariant_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    batch_invariant = False  # set by layers/batch_invariance.py

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.batch_invariant)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_full(param, loaded)


class ColumnParallelLinear(LinearBase):
    """Splits the output features; each rank produces its slice of the output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        group = current_group()
        self.tp_size, self.tp_rank = group.size, group.rank
        self.full_out = out_features
        super().__init__(in_features, divide(out_features, self.tp_size, "output size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, (self.full_out, *param.shape[1:]))
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Projections of one input that the checkpoint keeps apart (q/k/v, gate/up) computed as one
    matrix product: each rank's weight is its slice of every projection, stacked. A checkpoint
    tensor loads into its own rows (its `shard`)."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False):
        tp_size = current_group().size
        self.shard_sizes = list(shard_sizes)  # full output size of each projection
        self.rank_sizes = [divide(size, tp_size, "output size") for size in shard_sizes]
        super().__init__(in_features, sum(shard_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        check_shape(loaded, (self.shard_sizes[shard], *param.shape[1:]))
        rows = self.rank_sizes[shard]
        start = sum(self.rank_sizes[:shard])
        param.data.narrow(0, start, rows).copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """This rank's output of each projection (views of `out`)."""
        return list(out.split(self.rank_sizes, dim=-1))


class RowParallelLinear(LinearBase):
    """Splits the input features; the partial outputs are summed across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.group = current_group()
        self.tp_size, self.tp_rank = self.group.size, self.group.rank
        self.full_in = in_features
        super().__init__(divide(in_features, self.tp_size, "input size"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            copy_full(param, loaded)
            return
        check_shape(loaded, (param.shape[0], self.full_in))
        cols = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return project(x, self.weight, self.bias, self.batch_invariant)
        out = self.group.all_reduce(project(x, self.weight, None, self.batch_invariant))
        if self.bias is not None:
            out = out + self.bias
        return out

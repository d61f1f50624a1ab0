"""Copies checkpoint tensors into a model's (possibly sharded, possibly fused) parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from warmserve.layers.linear import ShapeMismatch

# (part of a checkpoint name, part of the model's parameter name, shard id inside that parameter)
FusedMapping = list[tuple[str, str, object]]


class WeightLoadError(ValueError):
    def __init__(self, tensor_name: str | None, problem: str):
        super().__init__(f"{tensor_name}: {problem}" if tensor_name else problem)
        self.tensor_name = tensor_name
        self.problem = problem


def load_parameters(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    fused: FusedMapping,
    skip: Callable[[str], bool] = lambda name: False,
) -> None:
    """Loads every parameter exactly once; raises WeightLoadError on an unknown, mis-shaped or
    missing tensor."""
    params = dict(model.named_parameters())
    needed = {name: {None} for name in params}
    for _, param_part, shard in fused:
        for name in params:
            if param_part in name:
                needed[name] = needed[name] - {None} | {shard}
    for name, tensor in tensors:
        if skip(name):
            continue
        target, shard = name, None
        for ckpt_part, param_part, shard_id in fused:
            if ckpt_part in name:
                target, shard = name.replace(ckpt_part, param_part), shard_id
                break
        param = params.get(target)
        if param is None:
            raise WeightLoadError(name, "tensor not used by this architecture")
        try:
            param.weight_loader(param, tensor, shard)
        except ShapeMismatch as exc:
            raise WeightLoadError(name, str(exc)) from exc
        needed[target].discard(shard)
    missing = sorted(
        checkpoint_name(name, shard, fused) for name, shards in needed.items() for shard in shards
    )
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(None, f"missing tensors {', '.join(missing[:5])}{more}")


def checkpoint_name(param_name: str, shard: object, fused: FusedMapping) -> str:
    """The checkpoint's name for one shard of a (possibly fused) parameter."""
    for ckpt_part, param_part, shard_id in fused:
        if shard_id == shard and param_part in param_name:
            return param_name.replace(param_part, ckpt_part)
    return param_name

"""Puts checkpoint tensors into a model's parameters: by copy (any device, any tensor-parallel
rank, dtype conversion) or by binding parameters to views of one device arena that already holds
the checkpoint's bytes (a reload: one bulk copy, no per-tensor work).

A model names the parameter each checkpoint tensor goes to with `parameter_name`, as
(parameter, shard): shard None for a tensor that is the whole parameter, else its index among the
projections that the parameter stacks (q/k/v into qkv_proj, gate/up into gate_up_proj).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from warmserve.layers.linear import ShapeMismatch, copy_full

# Checkpoint projection -> (the stacked parameter's module, index in the stack).
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

Target = tuple[str, int | None]


class WeightLoadError(ValueError):
    def __init__(self, tensor_name: str | None, problem: str):
        super().__init__(f"{tensor_name}: {problem}" if tensor_name else problem)
        self.tensor_name = tensor_name
        self.problem = problem


def fused_target(checkpoint_name: str, fused: dict[str, tuple[str, int]]) -> Target:
    """'....q_proj.weight' -> ('....qkv_proj.weight', 0) for the projections in `fused`."""
    module_path, _, attribute = checkpoint_name.rpartition(".")
    parent, _, module = module_path.rpartition(".")
    if module not in fused:
        return checkpoint_name, None
    stacked, shard = fused[module]
    prefix = f"{parent}." if parent else ""
    return f"{prefix}{stacked}.{attribute}", shard


def load_parameters(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies every parameter (every shard of a stacked one) from `tensors` exactly once; raises
    WeightLoadError on an unknown, mis-shaped or missing tensor."""
    slots = parameter_slots(model)
    missing = expected_pieces(model)
    for name, tensor in tensors:
        target = model.parameter_name(name)
        if target is None:
            continue
        parameter, shard = target
        slot = slots.get(parameter)
        if slot is None:
            raise WeightLoadError(name, "tensor not used by this architecture")
        module, attribute = slot
        param = module._parameters[attribute]
        weight_loader = getattr(module, "weight_loader", copy_full)
        try:
            if shard is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard)
        except ShapeMismatch as exc:
            raise WeightLoadError(name, str(exc)) from exc
        missing.discard(target)
    _check_complete(missing)


def bind_parameters(model: nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Makes each parameter a view of the checkpoint's bytes on the device (same dtype and
    shape), for a model built on the meta device with no tensor parallelism. The projections of
    a stacked parameter must lie side by side, in stack order (the host store lays them out so):
    the parameter is then one view spanning them."""
    slots = parameter_slots(model)
    pieces: dict[str, dict[int | None, tuple[str, torch.Tensor]]] = {}
    for name, view in views.items():
        target = model.parameter_name(name)
        if target is None:
            continue
        parameter, shard = target
        if parameter not in slots:
            raise WeightLoadError(name, "tensor not used by this architecture")
        pieces.setdefault(parameter, {})[shard] = (name, view)
    missing = expected_pieces(model) - {
        (parameter, shard) for parameter, found in pieces.items() for shard in found
    }
    _check_complete(missing)
    for parameter, found in pieces.items():
        module, attribute = slots[parameter]
        expected = module._parameters[attribute].shape
        name, view = _stacked_view(found)
        if view.shape != expected:
            raise WeightLoadError(
                name,
                f"shape {tuple(view.shape)} in the checkpoint, the model expects {tuple(expected)}",
            )
        module._parameters[attribute] = nn.Parameter(view, requires_grad=False)


def bind_whole_parameters(model: nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Makes each parameter the view of the same name (a tensor-parallel rank's shard, stored
    by parameter: stacked and sliced already), for a model built on the meta device."""
    slots = parameter_slots(model)
    unknown = sorted(set(views) - set(slots))
    if unknown:
        raise WeightLoadError(unknown[0], "tensor not used by this architecture")
    _check_complete({(name, None) for name in slots if name not in views})
    for name, view in views.items():
        module, attribute = slots[name]
        expected = module._parameters[attribute].shape
        if view.shape != expected:
            raise WeightLoadError(
                name,
                f"shape {tuple(view.shape)} in the shard, the model expects {tuple(expected)}",
            )
        module._parameters[attribute] = nn.Parameter(view, requires_grad=False)


def _stacked_view(found: dict[int | None, tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    """The one view of a parameter's pieces: the piece itself, or a view spanning adjacent
    shards."""
    if None in found:
        return found[None]
    ordered = [found[shard] for shard in sorted(found)]
    first_name, first = ordered[0]
    rows = first.shape[0]
    for (_, previous), (name, piece) in zip(ordered, ordered[1:], strict=False):
        adjacent = (
            piece.dtype == first.dtype
            and piece.shape[1:] == first.shape[1:]
            and piece.is_contiguous()
            and previous.data_ptr() + previous.nbytes == piece.data_ptr()
        )
        if not adjacent:
            raise WeightLoadError(name, "does not follow the other projections of its stack")
        rows += piece.shape[0]
    return first_name, first.as_strided((rows, *first.shape[1:]), first.stride())


def expected_pieces(model: nn.Module) -> set[Target]:
    """Every (parameter, shard) that a complete checkpoint fills."""
    pieces: set[Target] = set()
    for name, (module, _) in parameter_slots(model).items():
        shard_sizes = getattr(module, "shard_sizes", None)
        if shard_sizes is None:
            pieces.add((name, None))
        else:
            pieces.update((name, shard) for shard in range(len(shard_sizes)))
    return pieces


def parameter_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (owning module, attribute), computed once per module tree."""
    slots = model.__dict__.get("_parameter_slots")
    if slots is None:
        slots = {}
        for module_name, module in model.named_modules():
            for attribute, param in module._parameters.items():
                if param is not None:
                    prefix = f"{module_name}." if module_name else ""
                    slots[f"{prefix}{attribute}"] = (module, attribute)
        model.__dict__["_parameter_slots"] = slots
    return slots


def _check_complete(missing: set[Target]) -> None:
    if missing:
        names = sorted(_checkpoint_names(missing))
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise WeightLoadError(None, f"missing tensors {', '.join(names[:5])}{more}")


def _checkpoint_names(pieces: set[Target]) -> set[str]:
    """The checkpoint names of missing pieces, so that the error names what the file lacks."""
    unstacked = {stack: {} for stack, _ in FUSED_PROJECTIONS.values()}
    for projection, (stack, shard) in FUSED_PROJECTIONS.items():
        unstacked[stack][shard] = projection
    names = set()
    for parameter, shard in pieces:
        if shard is None:
            names.add(parameter)
            continue
        module_path, _, attribute = parameter.rpartition(".")
        parent, _, stack = module_path.rpartition(".")
        projection = unstacked.get(stack, {}).get(shard, f"{stack}[{shard}]")
        names.add(f"{parent}.{projection}.{attribute}" if parent else f"{projection}.{attribute}")
    return names

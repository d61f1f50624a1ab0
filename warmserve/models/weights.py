"""Puts checkpoint tensors into a model's parameters: by copy (any device, any tensor-parallel
rank, dtype conversion) or by binding parameters to views of one device arena that already holds
the checkpoint's bytes (a reload: one bulk copy, no per-tensor work)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from warmserve.layers.linear import ShapeMismatch, copy_full


class WeightLoadError(ValueError):
    def __init__(self, tensor_name: str | None, problem: str):
        super().__init__(f"{tensor_name}: {problem}" if tensor_name else problem)
        self.tensor_name = tensor_name
        self.problem = problem


def load_parameters(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies every parameter from `tensors` exactly once; raises WeightLoadError on an unknown,
    mis-shaped or missing tensor."""
    params = dict(model.named_parameters())
    missing = set(params)
    for name, tensor in tensors:
        target = model.parameter_name(name)
        if target is None:
            continue
        param = params.get(target)
        if param is None:
            raise WeightLoadError(name, "tensor not used by this architecture")
        module_name, _, _ = target.rpartition(".")
        weight_loader = getattr(model.get_submodule(module_name), "weight_loader", copy_full)
        try:
            weight_loader(param, tensor)
        except ShapeMismatch as exc:
            raise WeightLoadError(name, str(exc)) from exc
        missing.discard(target)
    _check_complete(missing)


def bind_parameters(model: nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Makes each parameter the checkpoint tensor's view (same device, dtype and shape), for a
    model built on the meta device with no tensor parallelism."""
    slots = parameter_slots(model)
    missing = set(slots)
    for name, view in views.items():
        target = model.parameter_name(name)
        if target is None:
            continue
        slot = slots.get(target)
        if slot is None:
            raise WeightLoadError(name, "tensor not used by this architecture")
        module, attribute = slot
        expected = module._parameters[attribute].shape
        if view.shape != expected:
            raise WeightLoadError(
                name,
                f"shape {tuple(view.shape)} in the checkpoint, the model expects {tuple(expected)}",
            )
        module._parameters[attribute] = nn.Parameter(view, requires_grad=False)
        missing.discard(target)
    _check_complete(missing)


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


def _check_complete(missing: set[str]) -> None:
    if missing:
        names = sorted(missing)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise WeightLoadError(None, f"missing tensors {', '.join(names[:5])}{more}")

"""Module trees of unloaded models, kept for reloads: a reload of the same architecture and config
binds the new weights onto the kept tree instead of building some thousand modules again, and,
when the segment's layout is the one bound before, replays the recorded binding (one view a
parameter) instead of working it out tensor by tensor."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from warmserve.loader.segment_weights import SegmentWeights
from warmserve.models.weights import bind_parameters, bind_whole_parameters, parameter_slots

KEPT = 4

# (module, attribute, dtype name, storage offset in elements, shape, stride) of each parameter.
Binding = tuple[nn.Module, str, str, int, tuple[int, ...], tuple[int, ...]]


@dataclass
class Skeleton:
    model: nn.Module
    # The parameters the tree was built with (on the meta device), put back at unload so that
    # nothing holds the freed device memory and no placeholder is allocated.
    placeholders: list[tuple[nn.Module, str, nn.Parameter]]
    layout: tuple | None = None  # the segment layout that `bindings` was recorded for
    bindings: list[Binding] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> Skeleton:
        slots = parameter_slots(model).values()
        return cls(model, [(module, name, module._parameters[name]) for module, name in slots])

    def bind(self, weights: SegmentWeights, arena: torch.Tensor) -> None:
        """Makes every parameter a view of `arena`, a device copy of `weights`' segment."""
        if self.layout != weights.layout:
            bind = bind_parameters if weights.rank is None else bind_whole_parameters
            bind(self.model, weights.views_into(arena))
            self._record(weights.layout)
            return
        typed = {dtype: arena.view(getattr(torch, dtype)) for dtype in weights.dtypes}
        for module, name, dtype, offset, shape, stride in self.bindings:
            view = typed[dtype].as_strided(shape, stride, offset)
            module._parameters[name] = nn.Parameter(view, requires_grad=False)

    def _record(self, layout: tuple) -> None:
        self.bindings = []
        for module, name, _ in self.placeholders:
            param = module._parameters[name]
            dtype = str(param.dtype).removeprefix("torch.")
            self.bindings.append(
                (module, name, dtype, param.storage_offset(), tuple(param.shape), param.stride())
            )
        self.layout = layout

    def unbind(self) -> None:
        for module, name, placeholder in self.placeholders:
            module._parameters[name] = placeholder
        for attention in self.model.attention_layers():
            attention.k_cache = attention.v_cache = None


class SkeletonCache:
    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self._skeletons: OrderedDict[tuple, Skeleton] = OrderedDict()

    def take(self, key: tuple) -> Skeleton | None:
        return self._skeletons.pop(key, None)

    def keep(self, key: tuple, skeleton: Skeleton) -> None:
        skeleton.unbind()
        self._skeletons[key] = skeleton
        while len(self._skeletons) > self.kept:
            self._skeletons.popitem(last=False)


SKELETONS = SkeletonCache()

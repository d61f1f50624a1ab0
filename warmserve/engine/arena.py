"""A model's weights put on the device from a host-store segment without per-tensor work: one
device allocation (the arena), one bulk copy, parameters bound as views of it. A tensor-parallel
rank does the same with its span of a shard segment, which it wrote itself after its first load
(`shard_layout`, `store_shard`).

On a GPU the copy runs on the worker's copy stream, so that a load never queues the kernels of
the models already serving on that device behind its copy; the model's first kernel waits for
the copy instead (`Engine.step`, engine/weight_copy.py).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from warmserve.engine.skeletons import SKELETONS, Skeleton
from warmserve.engine.weight_copy import WeightCopy
from warmserve.layers.parallel import current_group, set_group, tp_world_size
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.loader.weight_store import TENSOR_ALIGNMENT
from warmserve.models.weights import parameter_slots
from warmserve.protocol import TensorEntry

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def bindable(weights: SegmentWeights, dtype: torch.dtype) -> bool:
    """Whether the model's parameters can be views of one copy of the segment: a single rank, or
    a rank's own shard (no slicing), and the stored dtype (no conversion)."""
    whole = weights.rank is not None or tp_world_size() == 1
    return whole and weights.dtypes == {str(dtype).removeprefix("torch.")}


def shard_layout(model: nn.Module) -> list[TensorEntry]:
    """Where this rank's parameters would lie in a span of their own: in the order the model
    registers them (its forward order), each aligned as the store aligns tensors."""
    entries, cursor = [], 0
    for name, (module, attribute) in parameter_slots(model).items():
        param = module._parameters[attribute]
        cursor = -(-cursor // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
        dtype = str(param.dtype).removeprefix("torch.")
        entries.append(TensorEntry(name, dtype, list(param.shape), cursor, param.nbytes))
        cursor += param.nbytes
    return entries


def store_shard(model: nn.Module, span: SegmentWeights) -> None:
    """Writes the rank's parameters into its span, as `shard_layout` laid it out."""
    slots = parameter_slots(model)
    with torch.inference_mode():
        for entry in span.entries:
            module, attribute = slots[entry.name]
            span.write(entry, module._parameters[attribute].detach())


def model_on_arena(
    architecture, config, weights: SegmentWeights, device, dtype, key: tuple, phases: dict
) -> tuple[Skeleton, WeightCopy | None]:
    """The model bound to a fresh copy of the segment, and the copy its first kernel must wait
    for (None on the CPU, where the copy is done when this returns)."""
    started = time.perf_counter()
    skeleton = SKELETONS.take(key)
    fresh = skeleton is None
    if fresh:
        with torch.device("meta"), default_dtype(dtype):
            skeleton = Skeleton.of(architecture(config))
    else:  # a rank's kept tree still points at the group of the load it was built for
        set_group(skeleton.model, current_group())
    built = time.perf_counter()
    arena = torch.empty(weights.size, dtype=torch.uint8, device=device)
    copied = None
    if arena.is_cuda:
        if device not in _copy_streams:
            _copy_streams[device] = torch.cuda.Stream(device)
        stream = _copy_streams[device]
        copied = WeightCopy(
            stream, lambda: weights.copy_into(arena), in_thread=not weights.asynchronous_copy
        )
        arena.record_stream(stream)  # freed at unload only once the copy is done
    else:
        weights.copy_into(arena)
    issued = time.perf_counter()
    skeleton.bind(weights, arena)
    if fresh:  # buffers built on the CPU (rotary frequencies) move once; the skeleton keeps them
        for module in skeleton.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)
    bound = time.perf_counter()
    # The copy from registered memory is left running: everything that follows (the KV cache,
    # the reply, the first request's prefill launches) overlaps it. The worker keeps the
    # segment mapped until it forgets it, and synchronizes before that.
    phases.update(
        build_s=built - started,
        copy_issue_s=issued - built,
        bind_s=bound - issued,
        registered=float(weights.registered),
    )
    return skeleton, copied


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)

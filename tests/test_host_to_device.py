"""Host values reach the device by layers/host_to_device.to_device, never by
`torch.tensor(values, device=...)`: that copy is from pageable memory and waits for the stream,
the step just launched included, which undoes asynchronous scheduling. What that costs on a
GPU is in BENCHMARKS.md; here, that no module of a step's path makes such a copy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from warmserve.layers.host_to_device import to_device

PACKAGE = Path(__file__).resolve().parent.parent / "warmserve"
# What runs while a step is launched: the engine, its runner and graphs, and the layers that
# sample. attention.py's torch path is the CPU reference; logprobs read their results on the
# host at once, so their copies wait either way.
STEP_PATH = [
    "engine/engine.py",
    "engine/model_runner.py",
    "engine/launched_step.py",
    "engine/cuda_graphs.py",
    "engine/mixed_graphs.py",
    "layers/sampling.py",
    "layers/logits_processors.py",
    "layers/grammar.py",
]


def pageable_copies(path: Path) -> list[int]:
    """Lines that build a tensor from host values straight on a device."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("tensor", "as_tensor")
            and any(keyword.arg == "device" for keyword in node.keywords)
        ):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("module", STEP_PATH)
def test_no_pageable_copy_to_the_device_in_a_step(module):
    assert pageable_copies(PACKAGE / module) == []


def test_the_scan_finds_a_pageable_copy(tmp_path):
    source = tmp_path / "step.py"
    source.write_text("import torch\nrows = torch.tensor([1, 2], device='cuda')\n")
    assert pageable_copies(source) == [2]


def test_to_device_keeps_values_and_dtype():
    device = torch.device("cpu")
    assert to_device([[1, 2], [3, 4]], device).tolist() == [[1, 2], [3, 4]]
    assert to_device([1, 2], device, torch.long).dtype == torch.long
    assert to_device([0.5], device).dtype == torch.float32
    values = torch.arange(3)
    assert to_device(values, device).tolist() == [0, 1, 2]

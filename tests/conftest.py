"""A real `warmserve serve` subprocess (CPU, 2 workers) shared by every end-to-end test."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import CHECKPOINTS, SHARED_MODEL, serving


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

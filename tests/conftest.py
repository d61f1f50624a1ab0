"""A real `warmserve serve` subprocess (CPU, 2 workers) shared by every end-to-end test."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import CHECKPOINTS, SHARED_MODEL, RunningServer


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from warmserve.testing.checkpoints import ensure_checkpoint

    root = tmp_path_factory.mktemp("models")
    for path, family in CHECKPOINTS.items():
        ensure_checkpoint(root / path, family)
    return root


@pytest.fixture(scope="session")
def server(model_root, tmp_path_factory):
    running = RunningServer.start(model_root, tmp_path_factory.mktemp("server"))
    try:
        running.wait_until_healthy()
        worker_pids = running.worker_pids()
        yield running
        running.stop_and_check(worker_pids)
    finally:
        running.kill()


@pytest.fixture(scope="session")
def shared_model(server) -> str:
    with server.http() as http:
        response = http.post("/admin/models", json={"name": SHARED_MODEL, "path": SHARED_MODEL})
    assert response.status_code == 200, response.text
    return SHARED_MODEL

"""A real `warmserve serve` subprocess (CPU, 2 workers) shared by every end-to-end test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "e2e-test-key"
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 30.0
# The checkpoints the server can load, by path under its --model-root: name -> family.
CHECKPOINTS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}
# Loaded once for the whole session; tests that load more unload what they loaded.
SHARED_MODEL = "tiny-llama"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


@dataclass
class RunningServer:
    url: str
    port: int
    api_key: str
    model_root: Path
    process: subprocess.Popen
    log_path: Path

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self, port: int | None = None):
        from openai import OpenAI

        return OpenAI(
            base_url=f"http://127.0.0.1:{port or self.port}/v1",
            api_key=self.api_key,
            max_retries=0,
            timeout=120,
        )

    def metric_samples(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics by (name, sorted labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        with self.http() as http:
            text = http.get("/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"warmserve serve exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(
        f"warmserve serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}"
    )


def _kill_process_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from warmserve.testing.checkpoints import ensure_checkpoint

    root = tmp_path_factory.mktemp("models")
    for path, family in CHECKPOINTS.items():
        ensure_checkpoint(root / path, family)
    return root


@pytest.fixture(scope="session")
def server(model_root, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    command = [
        sys.executable, "-m", "warmserve", "serve",
        "--device", "cpu", "--workers", "2", "--port", str(port),
        "--model-root", str(model_root), "--api-key", API_KEY,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # Its own session, so that the whole tree (server and workers) can be killed at the end.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    running = RunningServer(
        f"http://127.0.0.1:{port}", port, API_KEY, model_root, process, log_path
    )
    worker_pids: list[int] = []
    try:
        _wait_until_healthy(running)
        with running.http() as http:
            worker_pids = [w["pid"] for w in http.get("/admin/workers").json() if w["pid"]]
        yield running
        # A clean stop is part of the contract: SIGTERM, controller closed, workers gone.
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the server:\n{running.log_tail()}")
        assert returncode == 0, running.log_tail()
        deadline = time.monotonic() + 10
        while _pids_alive(worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pids_alive(worker_pids), "workers outlived the server"
    finally:
        _kill_process_group(process)


@pytest.fixture(scope="session")
def shared_model(server) -> str:
    with server.http() as http:
        response = http.post("/admin/models", json={"name": SHARED_MODEL, "path": SHARED_MODEL})
    assert response.status_code == 200, response.text
    return SHARED_MODEL

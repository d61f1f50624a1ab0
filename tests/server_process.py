"""Runs `warmserve serve` as a subprocess for the end-to-end tests, and talks to it."""

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
# The checkpoints the server can load, by path under its --model-root: path -> family.
CHECKPOINTS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}
# Loaded once for the whole session; tests that load more unload what they loaded.
SHARED_MODEL = "tiny-llama"
# In the server's --models registry: loaded on its first request, unloaded after each one.
REGISTERED_MODEL = "on-demand-qwen3"


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

    @classmethod
    def start(cls, model_root: Path, directory: Path) -> RunningServer:
        port = free_port()
        registry = directory / "models.yaml"
        registry.write_text(
            f"models:\n  - name: {REGISTERED_MODEL}\n    path: tiny-qwen3\n    keep_alive: 0\n"
        )
        command = [
            sys.executable, "-m", "warmserve", "serve",
            "--device", "cpu", "--workers", "2", "--port", str(port),
            "--model-root", str(model_root), "--models", str(registry), "--api-key", API_KEY,
        ]  # fmt: skip
        log_path = directory / "serve.log"
        with open(log_path, "wb") as log:
            # Its own session, so that the whole tree (server and workers) can be killed.
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        return cls(f"http://127.0.0.1:{port}", port, API_KEY, model_root, process, log_path)

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"warmserve serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(
            f"warmserve serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}"
        )

    def worker_pids(self) -> list[int]:
        with self.http() as http:
            return [worker["pid"] for worker in http.get("/admin/workers").json() if worker["pid"]]

    def stop_and_check(self, worker_pids: list[int]) -> None:
        """SIGTERM must close the controller and leave no worker behind."""
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the server:\n{self.log_tail()}")
        assert returncode == 0, self.log_tail()
        deadline = time.monotonic() + 10
        while _alive(worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pids), "workers outlived the server"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

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


def _alive(pids: list[int]) -> list[int]:
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

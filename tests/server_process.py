"""Runs `warmserve serve` as a subprocess for the end-to-end tests, and talks to it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "e2e-test-key"
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 30.0
# The checkpoints the server can load, by path under its --model-root: path -> family.
CHECKPOINTS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3", "tiny-opt": "opt"}
# Loaded once for the whole session; tests that load more unload what they loaded.
SHARED_MODEL = "tiny-llama"
# In the server's --models registry: loaded on its first request, unloaded after each one.
REGISTERED_MODEL = "on-demand-qwen3"
DEFAULT_REGISTRY = (
    f"models:\n  - name: {REGISTERED_MODEL}\n    path: tiny-qwen3\n    keep_alive: 0\n"
)
SHM_DIR = Path("/dev/shm")
# warmserve's user cache for the tests (the real model, dequantized GGUF copies): gitignored,
# kept between runs.
TEST_CACHE_DIR = REPO_ROOT / ".checkpoints" / "cache"
TEST_CACHE_ENV = {"WARMSERVE_CACHE_DIR": str(TEST_CACHE_DIR)}
INSTANCE_LINE = re.compile(r"instance ([0-9a-z]+): shared memory")


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
    def start(
        cls,
        model_root: Path,
        directory: Path,
        registry: str = DEFAULT_REGISTRY,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> RunningServer:
        """Starts `warmserve serve --device cpu --workers 2` with `registry` as its --models."""
        port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        registry_path = directory / "models.yaml"
        registry_path.write_text(registry)
        command = [
            sys.executable, "-m", "warmserve", "serve",
            "--device", "cpu", "--workers", "2", "--port", str(port),
            "--model-root", str(model_root), "--models", str(registry_path),
            "--api-key", API_KEY, *extra_args,
        ]  # fmt: skip
        log_path = directory / "serve.log"
        with open(log_path, "wb") as log:
            # Its own session, so that the whole tree (server and workers) can be found and
            # killed, and Ctrl-C can be sent to it as a terminal would.
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=subprocess_env(**(env or {})),
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

    def instance(self) -> str:
        """The server's instance id, which names its shared memory and socket directory."""
        match = INSTANCE_LINE.search(self.log_path.read_text(errors="replace"))
        assert match, f"no instance line in the log:\n{self.log_tail()}"
        return match.group(1)

    def stop_and_check(self, worker_pids: list[int], signal_number: int = signal.SIGTERM) -> None:
        """SIGTERM (or SIGINT) must close the controller and leave nothing behind."""
        instance = self.instance()
        if signal_number == signal.SIGINT:
            os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
        else:
            self.process.send_signal(signal_number)
        returncode = self.wait_and_check_clean(instance, worker_pids)
        assert returncode == 0, self.log_tail()

    def wait_and_check_clean(self, instance: str | None, worker_pids: list[int]) -> int:
        """Waits for the server to exit, then asserts that no process of its session, no
        shared memory and no socket directory of its instance is left; returns its exit code."""
        try:
            returncode = self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not stop:\n{self.log_tail()}")
        deadline = time.monotonic() + 10
        while self.leftover_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pids), "workers outlived the server"
        assert not self.leftover_processes(), f"orphans: {self.leftover_processes()}"
        if instance is not None:
            assert not list(SHM_DIR.glob(f"warmserve-{instance}-*")), "shared memory left"
            assert not list(Path("/tmp").glob(f"warmserve-{instance}-*")), "socket dir left"
        return returncode

    def leftover_processes(self) -> list[str]:
        """Processes still in the server's session (its workers and helpers), as 'pid name'."""
        return processes_in_session(self.process.pid)

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


@contextlib.contextmanager
def serving(model_root: Path, directory: Path, **options) -> Iterator[RunningServer]:
    """A started, healthy server for the length of the block; stopped with SIGTERM and checked
    for leftovers at the end (killed if anything fails)."""
    running = RunningServer.start(model_root, directory, **options)
    try:
        running.wait_until_healthy()
        worker_pids = running.worker_pids()
        yield running
        running.stop_and_check(worker_pids)
    finally:
        running.kill()


def unload_everything(http: httpx.Client, timeout_s: float = 30.0) -> None:
    """Brings a shared server back to no model loaded, whatever a previous test left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = http.get("/admin/models").json()
        present = [m for m in models if m["state"] in ("loaded", "loading", "unloading", "failed")]
        if not present:
            return
        for model in present:
            if model["state"] in ("loaded", "failed"):
                http.delete(f"/admin/models/{model['name']}")
        time.sleep(0.05)
    pytest.fail(f"models still present: {http.get('/admin/models').json()}")


def processes_in_session(session_id: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[3]) == session_id and fields[0] != "Z":
                found.append(f"{stat.parent.name} {text[text.index('(') + 1 : text.rindex(')')]}")
    return found


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

"""`warmserve serve` as a subprocess of a benchmark: started on a free port, waited for, stopped."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import warmserve

STARTUP_TIMEOUT_S = 600.0  # a GPU worker's first start imports torch and builds its kernels
SHUTDOWN_TIMEOUT_S = 60.0


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with its log's tail."""


def _terminate_with_parent() -> None:
    """In the server, before it runs: SIGTERM when the benchmark dies, however it dies (a
    killed CI run must not leave a server and its workers running)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchServer:
    """Runs `python -m warmserve serve --device DEVICE --port P --model-root ROOT *serve_args`,
    logging to `log_path`. Use as a context manager: entering waits for /health."""

    def __init__(
        self,
        device: str,
        model_root: Path,
        serve_args: list[str],
        log_path: Path,
        environment: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "warmserve", "serve",
            "--device", device, "--port", str(self.port), "--model-root", str(model_root),
            *serve_args,
        ]  # fmt: skip
        self.log_path = log_path
        self.environment = environment or {}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BenchServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The server must import this same warmserve, wherever the benchmark was started from.
        package_parent = str(Path(warmserve.__file__).resolve().parents[1])
        paths = [package_parent, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, **self.environment, "PYTHONPATH": os.pathsep.join(paths)}
        with open(self.log_path, "wb") as log:
            # Its own process group, so that a server that ignores SIGTERM can be killed whole,
            # workers included.
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"warmserve serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise ServerFailed(
            f"warmserve serve not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far (its workers are other processes), or
        None where /proc cannot tell (not Linux)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        # utime and stime, fields 14 and 15 of stat(5); the split starts at field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

"""Start-up and shut-down of real servers: graceful SIGTERM and Ctrl-C, two servers side by side,
and start-up failures that end in one line, a non-zero exit and nothing left behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_process import (
    INSTANCE_LINE,
    REPO_ROOT,
    SHM_DIR,
    RunningServer,
    free_port,
    processes_in_session,
    subprocess_env,
)
from streams import stream_completion

pytestmark = pytest.mark.slow

REGISTRY = "models:\n  - name: m\n    path: tiny-llama\n"
# About two seconds of generation for the tiny model on a busy 2-core machine: long enough to
# be in flight when the signal comes, far shorter than the 10 s grace period.
IN_FLIGHT_TOKENS = 480
START_UP_FAILURE_TIMEOUT_S = 120


def test_two_servers_side_by_side_then_sigterm_and_ctrl_c_shut_down_cleanly(model_root, tmp_path):
    servers = [
        RunningServer.start(model_root, tmp_path / f"server-{index}", registry=REGISTRY)
        for index in range(2)
    ]
    try:
        for server in servers:
            server.wait_until_healthy()
        instances = [server.instance() for server in servers]
        assert instances[0] != instances[1]
        pids = [server.worker_pids() for server in servers]
        assert not set(pids[0]) & set(pids[1])
        texts = []
        for server in servers:  # the first request loads the model from disk into shared memory
            with server.http() as http:
                body = {"model": "m", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
                response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        assert texts[0] == texts[1]
        for instance in instances:
            assert list(SHM_DIR.glob(f"warmserve-{instance}-*")), "no shared memory to clean up"
            assert list(Path("/tmp").glob(f"warmserve-{instance}-*")), "no socket dir"

        first, second = servers
        stream = finish_during_shutdown(first, lambda: first.stop_and_check(pids[0]))
        assert stream.completed and stream.completion_tokens == IN_FLIGHT_TOKENS, stream
        with second.http() as http:  # the other server never noticed
            assert http.post("/v1/completions", json={"model": "m", "prompt": "a"}).is_success
        stream = finish_during_shutdown(
            second, lambda: second.stop_and_check(pids[1], signal_number=signal.SIGINT)
        )
        assert stream.completed and stream.completion_tokens == IN_FLIGHT_TOKENS, stream
    finally:
        for server in servers:
            server.kill()


def finish_during_shutdown(server: RunningServer, shut_down):
    """Starts a long stream, shuts the server down while it runs, and checks that new
    connections are refused meanwhile; returns how the stream ended."""
    streaming = threading.Event()
    ended = {}

    def stream() -> None:
        with server.http() as http:
            body = {
                "model": "m",
                "prompt": "Hi",
                "max_tokens": IN_FLIGHT_TOKENS,
                "ignore_eos": True,
            }
            ended["outcome"] = stream_completion(http, body, lambda o: streaming.set())

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60)
    stopper = threading.Thread(target=shut_down)
    stopper.start()
    refused_while_streaming = False
    deadline = time.monotonic() + 5
    while reader.is_alive() and time.monotonic() < deadline:
        try:
            httpx.get(f"{server.url}/health", timeout=1)
        except httpx.ConnectError:
            refused_while_streaming = reader.is_alive()
            break
        time.sleep(0.02)
    reader.join(timeout=60)
    stopper.join(timeout=120)
    assert refused_while_streaming, "new connections were accepted during the shutdown"
    return ended["outcome"]


def start_and_fail(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs `warmserve serve` expecting it to fail; returns its exit code and stderr after
    checking that nothing of it is left behind."""
    process = subprocess.Popen(
        [sys.executable, "-m", "warmserve", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**(env or {})),
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=START_UP_FAILURE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 10
    while processes_in_session(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_in_session(process.pid), "orphans after a failed start"
    match = INSTANCE_LINE.search(stderr)
    if match:
        instance = match.group(1)
        assert not list(SHM_DIR.glob(f"warmserve-{instance}-*"))
        assert not list(Path("/tmp").glob(f"warmserve-{instance}-*"))
    return process.returncode, stderr


def error_line(stderr: str) -> str:
    """The one error line, which must be the last thing the server printed."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("warmserve: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors[0]


def test_port_in_use_fails_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = start_and_fail(["--device", "cpu", "--port", str(port)])
    line = error_line(stderr)
    assert code == 1 and f"127.0.0.1:{port}" in line and "another with --port" in line
    assert "Traceback" not in stderr


def test_device_cuda_without_a_gpu_fails_with_advice():
    code, stderr = start_and_fail(
        ["--device", "cuda", "--port", str(free_port())], env={"CUDA_VISIBLE_DEVICES": ""}
    )
    line = error_line(stderr)
    assert code == 1 and "no GPU is visible" in line and "--device cpu" in line
    assert "Traceback" not in stderr


def test_worker_failing_its_warm_up_fails_the_start():
    code, stderr = start_and_fail(
        ["--device", "cpu", "--port", str(free_port())], env={"WARMSERVE_FAIL_WARMUP": "1"}
    )
    line = error_line(stderr)
    assert code == 1
    assert "failed its warm-up" in line and "unset it to start normally" in line
    assert INSTANCE_LINE.search(stderr), "the pool never started"

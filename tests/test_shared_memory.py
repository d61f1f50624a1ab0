"""Shared resources left by a server that was SIGKILLed are removed by the next one; a running
server's are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from warmserve.controller import shared_memory
from warmserve.controller.shared_memory import new_instance_name, remove_stale_instances


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_segments_and_socket_folders_of_dead_servers_are_removed(tmp_path, monkeypatch):
    shm, sockets = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    sockets.mkdir()
    monkeypatch.setattr(shared_memory, "SHM_DIR", shm)
    monkeypatch.setattr(shared_memory, "SOCKET_DIR", sockets)
    dead = f"{dead_pid()}p0a1b2c"
    alive = new_instance_name()
    assert alive.startswith(f"{os.getpid()}p")
    for instance in (dead, alive):
        (shm / f"warmserve-{instance}-1").write_bytes(b"weights")
        (shm / f"warmserve-{instance}-1.ready").write_bytes(b"\0" * 8)
        (sockets / f"warmserve-{instance}-x1y2").mkdir()
    (shm / "warmserve-unrelated").write_bytes(b"")  # not an instance's: left alone

    removed = remove_stale_instances()

    assert sorted(path.name for path in removed) == sorted(
        [f"warmserve-{dead}-1", f"warmserve-{dead}-1.ready", f"warmserve-{dead}-x1y2"]
    )
    left = sorted(path.name for folder in (shm, sockets) for path in folder.iterdir())
    assert left == sorted(
        [
            f"warmserve-{alive}-1",
            f"warmserve-{alive}-1.ready",
            f"warmserve-{alive}-x1y2",
            "warmserve-unrelated",
        ]
    )

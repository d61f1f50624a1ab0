"""Names of a server instance's shared resources, and removing those of instances that died.

A server's host-store segments (/dev/shm/warmserve-<instance>-*) and worker socket folder
(/tmp/warmserve-<instance>-*) carry its instance name, which starts with the server's pid: a
server that was SIGKILLed cannot remove them, so the next one removes those whose pid no longer
runs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

log = logging.getLogger("warmserve.controller")
SHM_DIR = Path("/dev/shm")
SOCKET_DIR = Path("/tmp")
PREFIX = "warmserve-"
_INSTANCE = re.compile(r"^warmserve-(\d+)p[0-9a-f]+-")


def new_instance_name() -> str:
    return f"{os.getpid()}p{uuid.uuid4().hex[:6]}"


def remove_stale_instances() -> list[Path]:
    """Removes the segments and socket folders of instances whose server is gone."""
    removed = []
    for folder in (SHM_DIR, SOCKET_DIR):
        try:
            entries = list(folder.glob(f"{PREFIX}*"))
        except OSError:
            continue
        for entry in entries:
            match = _INSTANCE.match(entry.name)
            if match is None or _running(int(match.group(1))):
                continue
            try:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                continue  # another server's clean-up got there first
            removed.append(entry)
    if removed:
        log.info(
            "removed %d shared-memory segment(s) or socket folder(s) of dead servers", len(removed)
        )
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True

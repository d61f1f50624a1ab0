"""`python -m warmserve.controller.launchers.worker_process`: a worker started by a Ray actor.
Its arguments come on stdin (they hold its CURVE keys, which a command line would show)."""

from __future__ import annotations

import sys

import msgspec

from warmserve.controller.launchers.base import WORKER_ENTRY
from warmserve.controller.launchers.local import run_entry
from warmserve.protocol import WorkerArgs

if __name__ == "__main__":
    run_entry(WORKER_ENTRY, msgspec.msgpack.decode(sys.stdin.buffer.read(), type=WorkerArgs))

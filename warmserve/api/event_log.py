"""INFO log lines written from the HTTP layer: a load's start and its progress, and requests
refused with a client error.

The controller logs the rest itself: loads done, unloads, failures, auto-loads, evictions,
keep-alive unloads, and the requests its admission refuses (503).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Scope

from warmserve.controller.errors import ControllerError
from warmserve.text_tables import describe_progress

models_log = logging.getLogger("warmserve.models")
requests_log = logging.getLogger("warmserve.requests")

# A load from disk that takes longer than this logs its progress this often.
PROGRESS_EVERY_S = 5.0


class LoadProgressLog:
    def __init__(self, controller):
        self.controller = controller
        self._progress_tasks: set[asyncio.Task] = set()

    def on_model_event(self, event: str, name: str) -> None:
        """Controller listener: a load that starts is logged, then its progress until it ends."""
        if event != "loading":
            return
        try:
            info = self.controller.model(name)
        except ControllerError:  # gone again already
            return
        models_log.info("loading %s from %s", name, info.path)
        task = asyncio.get_running_loop().create_task(self._log_progress(name))
        self._progress_tasks.add(task)
        task.add_done_callback(self._progress_tasks.discard)

    async def _log_progress(self, name: str) -> None:
        """Bytes read into host memory, rate and time left, while the model loads."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            try:
                info = self.controller.model(name)
            except ControllerError:
                return
            progress = self.controller.stores.fill_progress(info.path)
            if info.state != "loading" or progress is None:
                return
            done, total = progress
            elapsed = time.monotonic() - started
            models_log.info("loading %s: %s", name, describe_progress(done, total, elapsed))


def log_refusal(scope: Scope, status: int, code: str, message: str) -> None:
    """One line for each request refused with a client error, with its reason."""
    requests_log.info(
        "refused %s %s: %d %s: %s", scope["method"], scope["path"], status, code, message
    )

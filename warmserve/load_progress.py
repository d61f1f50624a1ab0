"""`warmserve load` progress: while the server loads, the bytes read into host memory, the rate
and the time left, polled from GET /admin/models/{name}/progress."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO

from warmserve.client import ServerError
from warmserve.text_tables import describe_progress

POLL_S = 0.5
# Without a terminal, a plain line this often instead of one line redrawn in place.
PLAIN_LINE_EVERY_S = 5.0


def load_with_progress(
    name: str,
    load: Callable[[], dict],
    progress: Callable[[str], dict],
    out: TextIO,
) -> dict:
    """Runs `load()` (the blocking admin request) in a thread and reports `progress(name)` on
    `out` until it returns; returns (or raises) what `load()` did."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = load()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    interactive = out.isatty()
    started = time.monotonic()
    last_plain = 0.0
    drawn = False
    while True:
        worker.join(POLL_S)
        if not worker.is_alive():
            break
        try:
            report = progress(name)
        except ServerError:  # not known to the server yet (its checkpoint is being read)
            continue
        done, total = report.get("bytes_done"), report.get("bytes_total")
        if report.get("state") != "loading" or not total:
            continue
        line = f"loading {name}: {describe_progress(done, total, time.monotonic() - started)}"
        if interactive:
            out.write(f"\r{line}\033[K")
            drawn = True
        elif time.monotonic() - last_plain >= PLAIN_LINE_EVERY_S:
            out.write(line + "\n")
            last_plain = time.monotonic()
        out.flush()
    if drawn:
        out.write("\r\033[K")
        out.flush()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

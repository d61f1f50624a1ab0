"""`warmserve load` reports bytes, rate and time left while the server reads the weights."""

from __future__ import annotations

import io
import itertools
import time

import pytest

from warmserve.client import ServerError
from warmserve.load_progress import describe_progress, load_with_progress

GIB = 2**30


def test_describe_progress():
    assert describe_progress(GIB // 2, GIB, 2.0) == (
        "512.0 MiB of 1.0 GiB (50%), 256.0 MiB/s, ETA 2 s"
    )
    assert describe_progress(0, GIB, 0.0) == "0 B of 1.0 GiB (0%)"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_redrawn_while_the_load_runs_then_cleared(monkeypatch):
    monkeypatch.setattr("warmserve.load_progress.POLL_S", 0.01)
    reports = itertools.chain(
        [ServerError("model 'm' is neither loaded nor registered")],
        ({"state": "loading", "bytes_done": done, "bytes_total": GIB} for done in (0, GIB // 4)),
        itertools.repeat({"state": "loaded", "bytes_done": GIB, "bytes_total": GIB}),
    )

    def progress(name: str) -> dict:
        report = next(reports)
        if isinstance(report, Exception):
            raise report
        return report

    def load() -> dict:
        time.sleep(0.3)
        return {"name": "m"}

    out = FakeTerminal()
    assert load_with_progress("m", load, progress, out) == {"name": "m"}
    written = out.getvalue()
    assert "\rloading m: 0 B of 1.0 GiB (0%)" in written
    assert "\rloading m: 256.0 MiB of 1.0 GiB (25%), " in written and " ETA " in written
    assert written.endswith("\r\033[K")  # the line is cleared for the final message


def test_a_failed_load_raises_its_error(monkeypatch):
    monkeypatch.setattr("warmserve.load_progress.POLL_S", 0.01)

    def load() -> dict:
        raise ServerError("path 'x' not found (HTTP 400, invalid_checkpoint)")

    with pytest.raises(ServerError, match="not found"):
        load_with_progress("m", load, lambda name: {}, io.StringIO())

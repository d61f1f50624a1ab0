"""`warmserve load` reports bytes, rate and time left while the server reads the weights."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import time

import pytest

from warmserve.api.event_log import LoadProgressLog
from warmserve.client import ServerError
from warmserve.controller.types import ModelInfo
from warmserve.load_progress import load_with_progress
from warmserve.text_tables import describe_progress

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


class LoadingController:
    """A model half read from disk, then loaded."""

    def __init__(self):
        self.info = ModelInfo("m", "/models/m", "loading")
        self.stores = self

    def model(self, name: str) -> ModelInfo:
        return self.info

    def fill_progress(self, key: str) -> tuple[int, int]:
        assert key == "/models/m"
        return GIB // 2, GIB


def test_the_server_logs_a_slow_loads_progress(monkeypatch, caplog):
    monkeypatch.setattr("warmserve.api.event_log.PROGRESS_EVERY_S", 0.01)
    caplog.set_level(logging.INFO, logger="warmserve.models")
    controller = LoadingController()

    async def load() -> int:
        LoadProgressLog(controller).on_model_event("loading", "m")
        await asyncio.sleep(0.1)
        controller.info.state = "loaded"
        await asyncio.sleep(0.05)  # the logger's next look sees it loaded
        lines_when_loaded = len(caplog.records)
        await asyncio.sleep(0.1)
        return lines_when_loaded

    lines_when_loaded = asyncio.run(load())
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "loading m from /models/m"
    assert lines[1].startswith("loading m: 512.0 MiB of 1.0 GiB (50%), ")
    assert len(lines) == lines_when_loaded  # no progress lines once the model is loaded

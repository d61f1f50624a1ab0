"""Serverless policies over load and unload: which models may be evicted now, which have been
idle too long."""

from __future__ import annotations

import time
from collections.abc import Iterable

from warmserve.controller.deployment import Deployment, DeploymentState

KEEP_ALIVE_CHECK_S = 0.5


def may_go(
    deployments: Iterable[Deployment], min_residency_s: float, now: float | None = None
) -> list[Deployment]:
    """Loaded models that may make room once idle: registered, not pinned, and resident for at
    least `min_residency_s` (so that a model's queued requests are served together before
    another model takes its memory)."""
    now = time.monotonic() if now is None else now
    return [
        d
        for d in deployments
        if d.may_make_room
        and d.state == DeploymentState.LOADED
        and now - d.loaded_at >= min_residency_s
    ]


def evictable_now(
    deployments: Iterable[Deployment], min_residency_s: float, now: float | None = None
) -> list[Deployment]:
    """Those of `may_go` with no request in flight: they may be evicted at once."""
    return [d for d in may_go(deployments, min_residency_s, now) if d.idle]


def expired(deployments: Iterable[Deployment], now: float) -> list[Deployment]:
    """Loaded models idle for longer than their keep-alive."""
    return [
        d
        for d in deployments
        if d.keep_alive >= 0 and d.idle and now - (d.last_used or now) >= d.keep_alive
    ]

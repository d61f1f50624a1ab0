"""Serverless policies over load and unload: which model to evict, which have been idle too long."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from warmserve.controller.controller import Deployment

KEEP_ALIVE_CHECK_S = 0.5


def _idle(deployment: Deployment) -> bool:
    return deployment.state == "loaded" and deployment.client.in_flight == 0


def eviction_candidate(deployments: Iterable[Deployment]) -> Deployment | None:
    """The least recently used loaded model that may make room: registered, not pinned, and
    with no request in flight."""
    candidates = [d for d in deployments if d.evictable and not d.pinned and _idle(d)]
    return min(candidates, key=lambda d: d.last_used or 0.0, default=None)


def expired(deployments: Iterable[Deployment], now: float) -> list[Deployment]:
    """Loaded models idle for longer than their keep-alive."""
    return [
        d
        for d in deployments
        if d.keep_alive >= 0 and _idle(d) and now - (d.last_used or now) >= d.keep_alive
    ]

"""What the gateway app and the per-model apps it opens share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI

from warmserve.api.event_log import LoadProgressLog
from warmserve.api.metrics import Metrics
from warmserve.api.ports import ModelListeners
from warmserve.config import ServerConfig


@dataclass
class Services:
    controller: object
    config: ServerConfig
    metrics: Metrics
    listeners: ModelListeners
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(
        cls, controller, config: ServerConfig, app_for_model: Callable[[str, Services], FastAPI]
    ) -> Services:
        # The factory runs only when a port opens, by which time `services` exists.
        listeners = ModelListeners(config.host, lambda name: app_for_model(name, services))
        services = cls(controller, config, Metrics(controller), listeners)
        controller.add_listener(services.listeners.on_model_event)
        controller.add_listener(services.metrics.on_model_event)
        controller.add_listener(LoadProgressLog(controller).on_model_event)
        return services

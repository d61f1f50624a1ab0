"""The FastAPI app: the gateway (every model, admin, metrics) or one model's own port."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from warmserve.api.admin_routes import admin_router
from warmserve.api.auth import APIKeyMiddleware
from warmserve.api.errors import install_error_handlers
from warmserve.api.limits import BodySizeLimitMiddleware
from warmserve.api.metrics import RequestCountMiddleware
from warmserve.api.openai_routes import openai_router
from warmserve.api.services import Services
from warmserve.api.status_routes import health_router, metrics_router
from warmserve.api.tokenize_routes import tokenize_router
from warmserve.config import ServerConfig


def create_app(
    controller,
    config: ServerConfig,
    only_model: str | None = None,
    *,
    services: Services | None = None,
) -> FastAPI:
    """The app serves a started controller; it does not start or close it.

    With `only_model` the app serves that model's OpenAI routes and /health only (a per-model
    port); `services` then are the gateway's, so its metrics count this port's requests too.
    """
    if services is None:
        services = Services.create(
            controller,
            config,
            lambda name, shared: create_app(controller, config, name, services=shared),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await services.listeners.close_all()

    gateway = only_model is None
    app = FastAPI(
        title="warmserve" if gateway else f"warmserve: {only_model}",
        lifespan=lifespan if gateway else None,
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health_router(services))
    app.include_router(openai_router(services, only_model))
    app.include_router(tokenize_router(services, only_model))
    if gateway:
        app.include_router(admin_router(services))
        app.include_router(metrics_router(services))

    # Added innermost first: requests are counted, then authenticated, then size-checked.
    app.add_middleware(BodySizeLimitMiddleware)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestCountMiddleware, metrics=services.metrics)
    return app

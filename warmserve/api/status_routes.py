"""/health for load balancers and /metrics for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from warmserve.api.services import Services


def health_router(services: Services) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        live = sum(1 for worker in services.controller.workers() if worker.state != "dead")
        if live == 0:
            return JSONResponse({"status": "unavailable", "workers": 0}, status_code=503)
        return JSONResponse({"status": "ok", "workers": live})

    return router


def metrics_router(services: Services) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router

"""Admin routes: load and unload models, register and unregister them, list models and workers."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from warmserve.api.openai_schemas import KeepAlive
from warmserve.api.services import Services
from warmserve.config import DTYPES
from warmserve.controller.registry import spec_from_fields

Dtype = Literal[tuple(sorted(DTYPES))]


class ModelRequest(BaseModel):
    """Fields shared by a load and a registration."""

    # A misspelt option must fail loudly rather than load the model with its default.
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    # Bounds are checked once, by ModelSpec (a 400 naming the field).
    tensor_parallel_size: int = 1
    dtype: Dtype = "auto"
    max_model_len: int | None = None
    keep_alive: KeepAlive = None

    @field_validator("name")
    @classmethod
    def _name_is_not_padded(cls, name: str) -> str:
        # Clients put the name in "model" verbatim; stray spaces would make it unreachable.
        if name != name.strip():
            raise PydanticCustomError("name", "name must not start or end with spaces")
        return name


class LoadModelRequest(ModelRequest):
    port: int | None = Field(None, ge=1, le=65535)


class RegisterModelRequest(ModelRequest):
    pinned: bool = False
    preload: bool = False


def admin_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin")
    controller = services.controller

    @router.post("/models")
    async def load_model(body: LoadModelRequest, request: Request) -> dict:
        reservation = services.listeners.reserve(body.port) if body.port is not None else None
        try:
            result = await controller.load(
                body.name,
                body.path,
                tensor_parallel_size=body.tensor_parallel_size,
                dtype=body.dtype,
                max_model_len=body.max_model_len,
                keep_alive=-1.0 if body.keep_alive is None else body.keep_alive,
            )
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        request.state.model = result.name
        if reservation is not None:
            await services.listeners.open(result.name, reservation)
        return {
            "name": result.name,
            "workers": result.workers,
            "load_seconds": result.load_seconds,
            "source": result.source,
            "port": body.port,
        }

    @router.delete("/models/{name}")
    async def unload_model(name: str, request: Request) -> dict:
        unload_seconds = await controller.unload(name)
        request.state.model = name
        # The "unloaded" event closes the port too; waiting here means that once this answers,
        # the port is closed.
        await services.listeners.close(name)
        return {"name": name, "unload_seconds": unload_seconds}

    @router.get("/models")
    async def list_models() -> list[dict]:
        models = []
        for info in controller.models():
            model = asdict(info)
            model["port"] = info.port or services.listeners.port_of(info.name)
            models.append(model)
        return models

    @router.get("/models/{name}/progress")
    async def load_progress(name: str) -> dict:
        """How much of the model's weights are in host memory: while a load from disk reads
        them, `bytes_done` grows to `bytes_total` (null when they are not in the host store)."""
        info = controller.model(name)
        progress = controller.stores.fill_progress(info.path)
        done, total = progress if progress is not None else (None, None)
        return {"name": name, "state": info.state, "bytes_done": done, "bytes_total": total}

    @router.post("/registry")
    async def register_model(body: RegisterModelRequest, request: Request) -> dict:
        """Registers a model that loads on its first request (at once with `preload`)."""
        await controller.register(spec_from_fields(body.model_dump(exclude_none=True)))
        request.state.model = body.name
        return asdict(controller.model(body.name))

    @router.delete("/registry/{name}")
    async def unregister_model(name: str, request: Request) -> dict:
        """Forgets a registered model, unloading it first if it is loaded."""
        await controller.unregister(name)
        return {"name": name}

    @router.get("/workers")
    async def list_workers() -> list[dict]:
        return [asdict(worker) for worker in controller.workers()]

    return router

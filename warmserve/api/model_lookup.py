"""Which model a request names, on the gateway (every model) or on one model's own port."""

from __future__ import annotations

from fastapi import Request

from warmserve.api.errors import APIError
from warmserve.controller.types import ModelInfo


def requested_model(controller, only_model: str | None, request: Request, name: str | None):
    """The named model's info. With `only_model` (a per-model port) a request may leave out
    "model", and naming another model is a 404."""
    if only_model is None and not name:
        raise APIError(400, "model: field required", "invalid_request")
    if only_model is not None and name and name != only_model:
        raise APIError(
            404, f"this port serves only model {only_model!r}, not {name!r}", "model_not_found"
        )
    info: ModelInfo = controller.model(only_model or name)
    # Known to exist now: safe to use as a metrics label.
    request.state.model = info.name
    return info

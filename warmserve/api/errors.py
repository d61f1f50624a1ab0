"""Every error leaves the HTTP layer as OpenAI's body `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from warmserve.api.event_log import log_refusal
from warmserve.config import ConfigError
from warmserve.controller.errors import ControllerError
from warmserve.controller.tokenizer import ChatTemplateError

logger = logging.getLogger("warmserve.api")

# OpenAI's error "type" values, so clients that branch on them behave as they do with OpenAI.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}
# Codes for the errors Starlette raises itself (unknown route, wrong method, ...).
HTTP_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}
INTERNAL_ERROR_MESSAGE = "internal server error; the server log has the details"
# What FastAPI says of a body it cannot decode (invalid UTF-8, nesting too deep, ...).
FASTAPI_BODY_ERROR = "There was an error parsing the body"


class APIError(Exception):
    """A client mistake found by the HTTP layer itself (the controller raises its own types)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_body(status: int, message: str, code: str) -> dict:
    return {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": code}
    }


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def controller_error_body(exc: ControllerError) -> tuple[int, dict]:
    """The status and body for a controller refusal. Its messages are written for clients; a
    server-side failure among them is logged too."""
    if exc.status >= 500 and exc.status != 503:
        logger.error("%s: %s", type(exc).__name__, exc)
    return exc.status, error_body(exc.status, str(exc) or exc.code, exc.code)


def retry_after_headers(exc: Exception) -> dict[str, str] | None:
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return None
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


def describe_validation_errors(errors: list[dict]) -> str:
    """One readable line from pydantic's error list, e.g. "temperature: must be <= 2"."""
    messages = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        if not location and error.get("type") == "model_attributes_type":
            return "request body must be a JSON object"
        message = error.get("msg", "invalid value")
        messages.append(f"{location}: {message}" if location else message)
    return "; ".join(messages) or "invalid request"


def refusal_response(
    request: Request, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response; a client error is logged with its reason (the controller logs the
    503s of its admission itself)."""
    if status < 500:
        log_refusal(request.scope, status, code, message)
    return error_response(status, message, code, headers)


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return refusal_response(request, exc.status, exc.message, exc.code)


async def _handle_controller_error(request: Request, exc: ControllerError) -> JSONResponse:
    status, body = controller_error_body(exc)
    if status < 500:
        log_refusal(request.scope, status, exc.code, body["error"]["message"])
    return JSONResponse(body, status_code=status, headers=retry_after_headers(exc))


async def _handle_bad_value(request: Request, exc: Exception) -> JSONResponse:
    return refusal_response(request, 400, str(exc), "invalid_request")


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = describe_validation_errors(exc.errors())
    return refusal_response(request, 400, message, "invalid_request")


async def _handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if message == FASTAPI_BODY_ERROR:
        message = "request body could not be parsed: send JSON encoded in UTF-8"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return refusal_response(request, exc.status_code, message, code, headers=exc.headers)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so the server logs its traceback.
    return error_response(500, INTERNAL_ERROR_MESSAGE, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(ControllerError, _handle_controller_error)
    app.add_exception_handler(ConfigError, _handle_bad_value)
    app.add_exception_handler(ChatTemplateError, _handle_bad_value)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(Exception, _handle_unexpected)

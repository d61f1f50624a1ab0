"""Caps request bodies so one client cannot make the server buffer unbounded JSON."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warmserve.api.errors import error_response
from warmserve.api.event_log import log_refusal

MAX_BODY_BYTES = 4 * 1024 * 1024


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large_message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            log_refusal(scope, 413, "request_too_large", self._too_large_message())
            response = error_response(413, self._too_large_message(), "request_too_large")
            await response(scope, receive, send)
            return

        received = 0

        async def receive_within_limit() -> Message:
            # A chunked body declares no length: count it as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large_message())
            return message

        await self.app(scope, receive_within_limit, send)

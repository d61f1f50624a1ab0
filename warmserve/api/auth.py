"""Bearer-token check for every route except /health, which load balancers probe without a key."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from warmserve.api.errors import error_response
from warmserve.api.event_log import log_refusal

UNAUTHENTICATED_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in UNAUTHENTICATED_PATHS
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
        log_refusal(scope, 401, "invalid_api_key", message)
        response = error_response(
            401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        # compare_digest takes as long for a near miss as for a wild guess.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._expected
        )

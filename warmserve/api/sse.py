"""Server-sent events exactly as the OpenAI clients parse them: `data: {json}` blocks, then
`data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from warmserve.api.errors import INTERNAL_ERROR_MESSAGE, controller_error_body, error_body
from warmserve.controller.errors import ControllerError

logger = logging.getLogger("warmserve.api")

DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Characters that JSON leaves as they are but str.splitlines() breaks lines at, as clients that
# read a stream with requests' or httpx's iter_lines() do: generated text may hold them. They
# can only occur inside JSON strings, where their escapes mean the same.
LINE_BREAKS_TO_ESCAPE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data.translate(LINE_BREAKS_TO_ESCAPE)}\n\n"


async def sse_events(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Once the first byte is out the status cannot change, so a failure mid-stream becomes an
    error event (which the openai client raises as an APIError), followed by [DONE]."""
    try:
        async for event in events:
            yield sse_event(event)
    except ControllerError as exc:
        yield sse_event(controller_error_body(exc)[1])
    except Exception:
        logger.exception("stream failed")
        yield sse_event(error_body(500, INTERNAL_ERROR_MESSAGE, "internal_error"))
    yield DONE_EVENT


def sse_response(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(
        sse_events(events), media_type="text/event-stream", headers=SSE_HEADERS
    )

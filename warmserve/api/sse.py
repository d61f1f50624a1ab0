"""Server-sent events exactly as the OpenAI clients parse them: `data: {json}` blocks, then
`data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

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


class TextChunkEvents:
    """The events of a stream's plain text chunks: one choice's new text, nothing else that
    changes from chunk to chunk. The chunk's model is rendered once per choice around a
    placeholder and each chunk's text is put in its place: building, validating and dumping the
    models for every token cost a stream more than anything else of ours but the socket write.
    An event is what sse_event of the model would be, but for the text's escapes (json.dumps
    escapes every non-ASCII character, line separators included)."""

    PLACEHOLDER = "@@warmserve-text@@"

    def __init__(self, render: Callable[[int, str], BaseModel]):
        self.render = render  # (choice index, text) -> the chunk
        self.templates: dict[int, tuple[str, str] | None] = {}

    def event(self, index: int, text: str) -> str:
        if index not in self.templates:
            rendered = sse_event(self.render(index, self.PLACEHOLDER))
            parts = rendered.split(json.dumps(self.PLACEHOLDER))
            # A model name holding the placeholder itself: no template, the slow way.
            self.templates[index] = (parts[0], parts[1]) if len(parts) == 2 else None
        template = self.templates[index]
        if template is None:
            return sse_event(self.render(index, text))
        return template[0] + json.dumps(text) + template[1]


async def sse_events(events: AsyncIterator[BaseModel | str]) -> AsyncIterator[str]:
    """`events`: models, or events already encoded (TextChunkEvents). Once the first byte is out
    the status cannot change, so a failure mid-stream becomes an error event (which the openai
    client raises as an APIError), followed by [DONE]."""
    try:
        async for event in events:
            yield event if isinstance(event, str) else sse_event(event)
    except ControllerError as exc:
        yield sse_event(controller_error_body(exc)[1])
    except Exception:
        logger.exception("stream failed")
        yield sse_event(error_body(500, INTERNAL_ERROR_MESSAGE, "internal_error"))
    yield DONE_EVENT


def sse_response(events: AsyncIterator[BaseModel | str]) -> StreamingResponse:
    return StreamingResponse(
        sse_events(events), media_type="text/event-stream", headers=SSE_HEADERS
    )

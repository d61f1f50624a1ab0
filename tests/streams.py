"""Reads OpenAI completion streams as a client sees them and says how each one ended."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    """How one request ended: refused up front (status != 200), or a stream that finished,
    failed with an error event, or was cut without either (truncated)."""

    status: int
    error: dict | None = None  # the JSON error, up front or from an error event
    retry_after: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the usage chunk
    text: str = ""
    done: bool = False  # saw data: [DONE]
    events: int = 0
    ended_at: float = field(default_factory=time.monotonic)

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.finish_reason is not None

    @property
    def failed_cleanly(self) -> bool:
        """Ended with an explicit error: a JSON error up front, or an error event then [DONE]."""
        if self.status != 200:
            return self.error is not None and {"message", "type", "code"} <= set(self.error)
        return self.done and self.error is not None

    def add_event(self, data: str) -> None:
        if data == "[DONE]":
            self.done = True
            return
        self.events += 1
        event = json.loads(data)
        if "error" in event:
            self.error = event["error"]
            return
        if event.get("usage"):
            self.completion_tokens = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            self.text += choice.get("text") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason


def refused(response: httpx.Response, body: bytes) -> Outcome:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        error = None
    return Outcome(response.status_code, error, response.headers.get("retry-after"))


def stream_body(body: dict) -> dict:
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def stream_completion(http: httpx.Client, body: dict, on_event=None) -> Outcome:
    """Streams /v1/completions; `on_event(outcome)` is called after each event."""
    with http.stream("POST", "/v1/completions", json=stream_body(body)) as response:
        if response.status_code != 200:
            return refused(response, response.read())
        outcome = Outcome(200)
        for line in response.iter_lines():
            if line.startswith("data: "):
                outcome.add_event(line.removeprefix("data: "))
                if on_event is not None:
                    on_event(outcome)
    outcome.ended_at = time.monotonic()
    return outcome


async def stream_completion_async(http: httpx.AsyncClient, body: dict, on_event=None) -> Outcome:
    async with http.stream("POST", "/v1/completions", json=stream_body(body)) as response:
        if response.status_code != 200:
            return refused(response, await response.aread())
        outcome = Outcome(200)
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                outcome.add_event(line.removeprefix("data: "))
                if on_event is not None:
                    on_event(outcome)
    outcome.ended_at = time.monotonic()
    return outcome


def hang_up_after_first_event(http: httpx.Client, body: dict, model: str) -> int:
    """Streams `body`, goes away after its first event, and waits (10 s at most) for the model's
    requests in flight to end; returns how many were left."""
    with http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while True:
        models = http.get("/admin/models").json()
        in_flight = next(m for m in models if m["name"] == model)["requests_in_flight"]
        if in_flight == 0 or time.monotonic() >= deadline:
            return in_flight
        time.sleep(0.01)

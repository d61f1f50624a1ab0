"""Tool calls found in a model's free text (tool_choice "auto"), in the formats chat templates
teach models:

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
  call, possibly after some text (the text stays the message's content);
- Llama 3: the whole reply is `{"name": ..., "parameters": {...}}` (or "arguments"), several
  separated by ";", possibly after `<|python_tag|>`.

A call must name one of the request's tools and carry a JSON object of arguments; text that is
anything else (malformed JSON, an unknown name, a plain JSON answer) stays content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_decoder = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass(frozen=True)
class ParsedReply:
    content: str | None
    tool_calls: list[ParsedToolCall]


def parse_reply(text: str, tool_names: set[str]) -> ParsedReply:
    calls = _hermes_calls(text, tool_names)
    if calls is not None:
        content = text[: text.index(HERMES_START)].strip()
        return ParsedReply(content or None, calls)
    calls = _llama3_calls(text, tool_names)
    if calls is not None:
        return ParsedReply(None, calls)
    return ParsedReply(text, [])


def tool_call_start(text: str) -> int | None:
    """Where a tool call may begin in a reply that is still being generated: the first
    `<tool_call>`, or 0 when the reply so far opens like a Llama 3 call (or could still become
    one of those openings); None while it reads as plain text."""
    index = text.find(HERMES_START)
    if index != -1:
        return index
    opening = text.lstrip()
    if opening.startswith(("{", PYTHON_TAG)) or (opening and PYTHON_TAG.startswith(opening)):
        return 0
    return None


def partial_marker_length(text: str) -> int:
    """How many characters at the end of `text` could be the start of `<tool_call>`: those are
    held back from a stream until the next piece tells."""
    for length in range(min(len(HERMES_START) - 1, len(text)), 0, -1):
        if HERMES_START.startswith(text[-length:]):
            return length
    return 0


def call_from_object(value: object, tool_names: set[str]) -> ParsedToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} naming a known tool, else None."""
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _hermes_calls(text: str, tool_names: set[str]) -> list[ParsedToolCall] | None:
    if HERMES_START not in text:
        return None
    calls = []
    for body in _HERMES_BLOCK.findall(text[text.index(HERMES_START) :]):
        try:
            call = call_from_object(json.loads(body), tool_names)
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _llama3_calls(text: str, tool_names: set[str]) -> list[ParsedToolCall] | None:
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith("{"):
        return None
    calls = []
    while rest:
        try:
            value, end = _decoder.raw_decode(rest)
        except json.JSONDecodeError:
            return None
        call = call_from_object(value, tool_names)
        if call is None:
            return None
        calls.append(call)
        rest = rest[end:].strip().removeprefix(";").strip()
    return calls

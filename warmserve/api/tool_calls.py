"""What a chat request's `tools` and `tool_choice` ask of its generation and its reply.

- "none" (the default without tools): the tools are not shown to the model; the reply is text.
- "auto" (the default with tools): the chat template shows the tools; calls the model writes in
  a known format (tool_parsers) become `tool_calls`.
- "required": the grammar forces a JSON array of `{"name", "parameters"}` objects, one of the
  tools each, so the arguments always parse against the tool's schema (vLLM's format).
- a named function: the grammar forces that function's arguments object.

Streams send content as it comes, holding back what may open a tool call; forced calls (named
or required) stream their arguments as they are generated; calls found in free text ("auto")
are sent whole once the reply is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from warmserve.api.structured_schemas import NamedToolChoice, Tool, ToolChoice
from warmserve.api.tool_parsers import (
    ParsedReply,
    ParsedToolCall,
    call_from_object,
    parse_reply,
    partial_marker_length,
    tool_call_start,
)
from warmserve.config import StructuredOutput

SCHEMA_DEFINITION_KEYS = ("$defs", "definitions")


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_body(call: ParsedToolCall, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class ToolCalling:
    def __init__(
        self,
        tools: list[Tool] | None,
        tool_choice: ToolChoice | None,
        parallel_tool_calls: bool | None,
    ):
        self.tools = tools or []
        self.choice = tool_choice if tool_choice is not None else "auto" if tools else "none"
        self.parallel = parallel_tool_calls is not False
        self.names = {tool.function.name for tool in self.tools}
        self.named = None  # the function a named choice forces
        if isinstance(self.choice, NamedToolChoice):
            forced = self.choice.function.name
            self.named = next(t.function for t in self.tools if t.function.name == forced)

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template takes them; None when the model must not call any."""
        if self.choice == "none" or not self.tools:
            return None
        return [tool.model_dump(by_alias=True, exclude_none=True) for tool in self.tools]

    def structured_output(self) -> StructuredOutput | None:
        if self.named is not None:
            schema = json.dumps(self.named.parameters_schema())
            return StructuredOutput("json_schema", schema, "tools.function.parameters")
        if self.choice == "required":
            schema = json.dumps(self._required_schema())
            return StructuredOutput("json_schema", schema, "tools.function.parameters")
        return None

    def _required_schema(self) -> dict[str, Any]:
        # A tool's parameters may refer to their own "#/$defs/..." (pydantic writes nested
        # models so); nested in the array schema, those must move to its root.
        definitions: dict[str, dict] = {key: {} for key in SCHEMA_DEFINITION_KEYS}
        variants = []
        for tool in self.tools:
            parameters = dict(tool.function.parameters_schema())
            for key in SCHEMA_DEFINITION_KEYS:
                definitions[key].update(parameters.pop(key, {}))
            variants.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [tool.function.name]},
                        "parameters": parameters,
                    },
                    "required": ["name", "parameters"],
                }
            )
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        if not self.parallel:
            schema["maxItems"] = 1
        schema.update({key: value for key, value in definitions.items() if value})
        return schema

    def reply(self, text: str) -> ParsedReply:
        if self.named is not None:
            return ParsedReply(None, [ParsedToolCall(self.named.name, text)])
        if self.choice == "required":
            return _forced_array(text, self.names)
        if self.choice == "auto":
            return parse_reply(text, self.names)
        return ParsedReply(text, [])

    def reply_stream(self) -> ReplyStream:
        return ReplyStream(self)


def _forced_array(text: str, names: set[str]) -> ParsedReply:
    """The reply of a "required" choice. The arguments are the generated text itself, as a
    stream sends them; text the grammar did not finish (cut by max_tokens) stays content."""
    try:
        complete = all(call_from_object(value, names) for value in json.loads(text))
    except (json.JSONDecodeError, TypeError):
        complete = False
    scanner = ForcedCallsScanner()
    scanner.feed(text)
    if not complete or not scanner.calls:
        return ParsedReply(text, [])
    return ParsedReply(None, [ParsedToolCall(name, arguments) for name, arguments in scanner.calls])


class ForcedCallsScanner:
    """Reads the calls of a "required" reply, `[{"name": "...", "parameters": {...}}, ...]` as
    the grammar writes it, while the text grows: each call's name once it is complete, then
    its arguments as they come."""

    # A call's opening up to its arguments' "{", where the arguments begin.
    HEADER = re.compile(r'\}?\s*[\[,]\s*\{"name":\s*"([^"\\]*)",\s*"parameters":\s*(?=\{)')

    def __init__(self):
        self.text = ""
        self.position = 0  # how far the text has been read
        self.calls: list[tuple[str, str]] = []  # (name, arguments so far)
        self.in_arguments = False
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, piece: str) -> list[tuple[int, str | None, str]]:
        """(call index, its name when the call is new, new arguments text) for each change."""
        self.text += piece
        changes = []
        while True:
            if not self.in_arguments:
                header = self.HEADER.match(self.text, self.position)
                if header is None:
                    return changes
                self.position, self.in_arguments = header.end(), True
                self.calls.append((header.group(1), ""))
                changes.append((len(self.calls) - 1, header.group(1), ""))
            start = self.position
            closed = self._read_arguments()
            if self.position > start:
                name, arguments = self.calls[-1]
                self.calls[-1] = (name, arguments + self.text[start : self.position])
                changes.append((len(self.calls) - 1, None, self.text[start : self.position]))
            if not closed:
                return changes
            self.in_arguments = False

    def _read_arguments(self) -> bool:
        """Advances over the arguments object; True once it is closed."""
        while self.position < len(self.text):
            char = self.text[self.position]
            self.position += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return True
        return False


class ReplyStream:
    """Turns a streamed reply's text into chat-chunk deltas."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self.sent = 0  # characters of the text sent as content
        self.named_call_id: str | None = None
        self.forced_calls = ForcedCallsScanner()
        self.forced_call_ids: list[str] = []
        self.called = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if self.calling.named is not None:
            return [self._named_arguments(piece)] if piece else []
        if self.calling.choice == "required":
            return [self._forced_call_delta(*change) for change in self.forced_calls.feed(piece)]
        if self.calling.choice == "none":
            self.sent = len(self.text)
            return [{"content": piece}] if piece else []
        start = tool_call_start(self.text)
        end = len(self.text) - partial_marker_length(self.text) if start is None else start
        return self._content_until(end)

    def finish(self) -> list[dict[str, Any]]:
        """The deltas left once the generation is complete."""
        if self.calling.named is not None:
            self.called = True
            return [self._named_arguments("")] if self.named_call_id is None else []
        if self.forced_call_ids:
            self.called = True
            return []
        reply = self.calling.reply(self.text)
        if not reply.tool_calls:
            return self._content_until(len(self.text))
        self.called = True
        calls = [
            {"index": index, **tool_call_body(call, new_tool_call_id())}
            for index, call in enumerate(reply.tool_calls)
        ]
        return [{"tool_calls": calls}]

    def _named_arguments(self, piece: str) -> dict[str, Any]:
        if self.named_call_id is None:
            self.named_call_id = new_tool_call_id()
            call = ParsedToolCall(self.calling.named.name, piece)
            return {"tool_calls": [{"index": 0, **tool_call_body(call, self.named_call_id)}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    def _forced_call_delta(self, index: int, name: str | None, arguments: str) -> dict[str, Any]:
        if name is None:
            return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
        self.forced_call_ids.append(new_tool_call_id())
        call = ParsedToolCall(name, arguments)
        return {"tool_calls": [{"index": index, **tool_call_body(call, self.forced_call_ids[-1])}]}

    def _content_until(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        content, self.sent = self.text[self.sent : end], end
        return [{"content": content}]

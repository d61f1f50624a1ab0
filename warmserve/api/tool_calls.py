"""What a chat request's `tools` and `tool_choice` ask of its generation and its reply.

- "none" (the default without tools): the tools are not shown to the model; the reply is text.
- "auto" (the default with tools): the chat template shows the tools; calls the model writes in
  a known format (tool_parsers) become `tool_calls`.
- "required": the grammar forces a JSON array of `{"name", "parameters"}` objects, one of the
  tools each, so the arguments always parse against the tool's schema (vLLM's format).
- a named function: the grammar forces that function's arguments object.

Streams send content as it comes, holding back what may open a tool call; a named call streams
its arguments as they are generated; other calls are sent whole once the reply is complete.
"""

from __future__ import annotations

import json
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
    """The reply of a "required" choice; text the grammar did not finish (cut by max_tokens)
    stays content."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        return ParsedReply(text, [])
    calls = [call_from_object(value, names) for value in values]
    if not calls or None in calls:
        return ParsedReply(text, [])
    return ParsedReply(None, calls)


class ReplyStream:
    """Turns a streamed reply's text into chat-chunk deltas."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self.sent = 0  # characters of the text sent as content
        self.named_call_id: str | None = None
        self.called = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if self.calling.named is not None:
            return [self._named_arguments(piece)] if piece else []
        if self.calling.choice == "required":
            return []
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

    def _content_until(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        content, self.sent = self.text[self.sent : end], end
        return [{"content": content}]

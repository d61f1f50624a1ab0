"""The HTTP layer of structured output and tool calls over an in-memory controller: which
grammar each field asks for, what reaches the chat template, and replies with tool calls read
from scripted model output, whole and streamed."""

from __future__ import annotations

import pytest
from test_api_unit import MODEL, sse_payloads

from warmserve.config import StructuredOutput

TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather"}},
]
MESSAGES = [{"role": "user", "content": "hi"}]
HERMES_REPLY = [
    "Checking.",
    "<tool_",
    'call>{"name": "get_time", "arguments": {"zone": "UTC"}}',
    "</tool_call>",
]


@pytest.mark.parametrize(
    ("route", "fields", "expected"),
    [
        (
            "chat",
            {"response_format": {"type": "json_object"}},
            StructuredOutput("json_object", field="response_format"),
        ),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            StructuredOutput("json_schema", "{}", "response_format.json_schema.schema"),
        ),
        ("chat", {"response_format": {"type": "text"}}, None),
        (
            "completions",
            {"guided_json": '{"type": "integer"}'},
            StructuredOutput("json_schema", '{"type": "integer"}', "guided_json"),
        ),
        ("completions", {"guided_regex": "a+"}, StructuredOutput("regex", "a+", "guided_regex")),
        (
            "completions",
            {"guided_choice": ["a", "b"]},
            StructuredOutput("choice", '["a", "b"]', "guided_choice"),
        ),
        (
            "chat",
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            StructuredOutput("json_schema", '{"type": "object"}', "tools.function.parameters"),
        ),
        ("chat", {"tools": TOOLS}, None),
    ],
    ids=["json-object", "json-schema", "text", "guided-json", "regex", "choice", "named", "auto"],
)
def test_each_field_asks_for_its_grammar(client, controller, route, fields, expected):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    if route == "chat":
        response = client.post("/v1/chat/completions", json={**body, "messages": MESSAGES})
    else:
        response = client.post("/v1/completions", json={**body, "prompt": "x"})
    assert response.status_code == 200, response.text
    assert controller.last_params.structured_output == expected


@pytest.mark.parametrize(("tool_choice", "shown"), [(None, True), ("auto", True), ("none", False)])
def test_tools_reach_the_template_unless_choice_is_none(client, controller, tool_choice, shown):
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    client.post("/v1/chat/completions", json=body).raise_for_status()
    assert controller.last_chat[0].startswith("tools: get_time, get_weather") == shown


def test_auto_reply_with_a_hermes_call_becomes_tool_calls(client, controller):
    controller.reply_pieces = HERMES_REPLY
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}


def test_auto_stream_sends_content_then_the_call(client, controller):
    controller.reply_pieces = HERMES_REPLY
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "stream": True}
    chunks = sse_payloads(client.post("/v1/chat/completions", json=body).text)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "Checking."}]
    [call] = deltas[2]["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert deltas[3:] == [{}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_reply_without_a_call_stays_content(client, controller):
    controller.reply_pieces = ['{"zone": ', '"UTC"}']
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": '{"zone": "UTC"}'}


def test_a_guided_json_string_that_is_not_json_is_refused(client):
    body = {"model": MODEL, "prompt": "x", "guided_json": "{nope"}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("guided_json: not valid JSON")

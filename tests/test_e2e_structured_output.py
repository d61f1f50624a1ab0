"""Structured output and tool calls through a real server and real clients (the openai SDK,
langchain-openai). The shared model has random weights: whatever it prefers, constrained output
must parse and validate against its schema."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Plan a short trip."}]


class Trip(BaseModel):
    city: Literal["Paris", "Rome", "Lima"]
    days: int = Field(ge=1, le=30)
    by_train: bool


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Quito"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}


def assert_valid_calls(tool_calls) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.id and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_sdk_parse_returns_the_pydantic_object(server, shared_model):
    completion = server.openai().chat.completions.parse(
        model=shared_model, messages=MESSAGES, response_format=Trip, max_tokens=100, seed=1
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Trip)
    assert Trip.model_validate_json(choice.message.content) == choice.message.parsed


def test_sdk_parse_of_a_strict_function_tool(server, shared_model):
    import openai

    completion = server.openai().chat.completions.parse(
        model=shared_model,
        messages=MESSAGES,
        tools=[openai.pydantic_function_tool(Trip)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        seed=2,
    )
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "Trip"
    assert isinstance(call.function.parsed_arguments, Trip)


def test_json_object_replies_are_json_objects(server, shared_model):
    """Random weights may write one string forever (cut by max_tokens); every reply the
    grammar ended is a JSON object, and some do end."""
    client = server.openai()
    ended = 0
    for seed in range(8):
        completion = client.chat.completions.create(
            model=shared_model,
            messages=MESSAGES,
            response_format={"type": "json_object"},
            max_tokens=40,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            ended += 1
    assert ended >= 1


def test_required_tool_choice_calls_a_tool_with_valid_arguments(server, shared_model):
    completion = server.openai().chat.completions.create(
        model=shared_model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        seed=3,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_streamed_tool_call_deltas_reassemble_to_the_same_calls(server, shared_model, tool_choice):
    client = server.openai()
    request = dict(
        model=shared_model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=100,
        seed=4,
    )
    whole = client.chat.completions.create(**request).choices[0]
    assert_valid_calls(whole.message.tool_calls)
    calls: dict[int, dict] = {}
    finish_reasons = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            finish_reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish_reasons[-1] == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (call.function.name, call.function.arguments) for call in whole.message.tool_calls
    ]
    assert all(call["id"].startswith("call_") for call in calls.values())


def test_a_conversation_with_tool_calls_and_results_is_accepted(server, shared_model):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    completion = server.openai().chat.completions.create(
        model=shared_model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=3
    )
    assert completion.choices[0].message.tool_calls is None


def test_guided_regex_and_choice_on_completions(server, shared_model):
    client = server.openai()
    regex = client.completions.create(
        model=shared_model,
        prompt="Code:",
        max_tokens=20,
        extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"},
    )
    assert regex.choices[0].finish_reason == "stop"
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[2] == "-"
    choice = client.completions.create(
        model=shared_model,
        prompt="Answer:",
        max_tokens=20,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
            "response_format.json_schema.schema",
        ),
        (
            # Valid JSON Schema that no string satisfies: the worker's compiler refuses it.
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "minLength": 5, "maxLength": 2}},
                }
            },
            "response_format.json_schema.schema: the json_schema cannot be compiled",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "x"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex and guided_choice"),
    ],
    ids=[
        "bad-schema",
        "unsatisfiable-schema",
        "unknown-tool",
        "choice-without-tools",
        "two-constraints",
    ],
)
def test_bad_constraints_are_refused_naming_the_field(server, shared_model, fields, named):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": shared_model, "messages": MESSAGES, **fields},
        )
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


def test_langchain_structured_output_and_forced_tools(server, shared_model):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=shared_model,
        base_url=f"{server.url}/v1",
        api_key=server.api_key,
        max_tokens=100,
        seed=1,
    )
    trip = chat.with_structured_output(Trip).invoke("Plan a short trip.")
    assert isinstance(trip, Trip)

    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return "12:00"

    message = chat.bind_tools([get_time], tool_choice="get_time").invoke("What time is it?")
    assert [call["name"] for call in message.tool_calls] == ["get_time"]
    assert message.tool_calls[0]["args"]["zone"] in ("UTC", "CET")

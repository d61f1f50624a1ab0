"""Tool calls read from model output (Hermes / Qwen and Llama 3 formats), the grammars forced
tool choices compile to, and the deltas a streamed reply becomes."""

from __future__ import annotations

import json

import jsonschema
import pytest

from warmserve.api.openai_schemas import ChatCompletionRequest
from warmserve.api.tool_parsers import ParsedToolCall, parse_reply
from warmserve.controller.tokenizer import ModelTokenizer

NAMES = {"get_weather", "get_time"}
WEATHER = ParsedToolCall("get_weather", '{"city": "Oslo"}')


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            None,
            [WEATHER],
        ),
        (
            'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
            "Let me look.",
            [WEATHER, ParsedToolCall("get_time", "{}")],
        ),
        # Generation ended by EOS right after the JSON: the closing tag may be missing.
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, [WEATHER]),
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [WEATHER]),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
            '{"name": "get_time", "arguments": "{}"}',
            None,
            [WEATHER, ParsedToolCall("get_time", "{}")],
        ),
    ],
    ids=["hermes", "hermes-after-text", "hermes-unclosed", "llama3", "llama3-two-python-tag"],
)
def test_tool_calls_are_read_from_known_formats(text, content, calls):
    reply = parse_reply(text, NAMES)
    assert (reply.content, reply.tool_calls) == (content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Oslo.",
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
        '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',
        '{"name": "get_weather", "parameters": [1, 2]}',
        '{"city": "Oslo", "temperature": 3}',
        '{"name": "get_weather", "parameters": {}} and then some words',
    ],
    ids=["text", "broken-json", "unknown-tool", "arguments-not-object", "plain-json", "trailing"],
)
def test_malformed_or_foreign_calls_stay_content(text):
    reply = parse_reply(text, NAMES)
    assert reply.tool_calls == [] and reply.content == text


def chat_request(**fields) -> ChatCompletionRequest:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"place": {"$ref": "#/$defs/Place"}},
                    "required": ["place"],
                    "$defs": {"Place": {"type": "string", "enum": ["Oslo"]}},
                },
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]
    fields = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate({"tools": tools, **fields})


def test_required_choice_forces_an_array_of_known_calls():
    """Each tool's own $defs move to the array schema's root, where its $refs point."""
    calling = chat_request(tool_choice="required", parallel_tool_calls=False).tool_calling()
    schema = json.loads(calling.structured_output().spec)
    call = {"name": "get_weather", "parameters": {"place": "Oslo"}}
    jsonschema.validate([call], schema)
    for wrong in ([], [call, call], [{"name": "get_weather", "parameters": {"place": "Rome"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    reply = calling.reply(json.dumps([call]))
    assert reply.tool_calls == [ParsedToolCall("get_weather", '{"place": "Oslo"}')]


def test_named_choice_forces_the_functions_arguments():
    calling = chat_request(
        tool_choice={"type": "function", "function": {"name": "get_time"}}
    ).tool_calling()
    assert json.loads(calling.structured_output().spec) == {"type": "object", "properties": {}}
    assert calling.reply("{}").tool_calls == [ParsedToolCall("get_time", "{}")]


def test_none_keeps_tools_out_of_the_prompt_and_the_reply():
    calling = chat_request(tool_choice="none").tool_calling()
    assert calling.template_tools() is None and calling.structured_output() is None
    text = '{"name": "get_time", "parameters": {}}'
    assert calling.reply(text).content == text


def stream(calling, pieces: list[str]) -> list[dict]:
    reply = calling.reply_stream()
    deltas = [delta for piece in pieces for delta in reply.feed(piece)]
    return deltas + reply.finish()


def test_auto_stream_sends_text_and_holds_back_what_may_open_a_call():
    calling = chat_request().tool_calling()
    pieces = [
        "Let me ",
        "look.<tool",
        '_call>{"name": "get_time", ',
        '"arguments": {}}</tool_call>',
    ]
    deltas = stream(calling, pieces)
    assert deltas[:2] == [{"content": "Let me "}, {"content": "look."}]
    [call] = deltas[2]["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": "{}"} and call["index"] == 0
    assert len(deltas) == 3


def test_auto_stream_of_plain_text_sends_all_of_it():
    calling = chat_request().tool_calling()
    deltas = stream(calling, ["<b>", "bold</b> and ", "{braces}"])
    assert "".join(delta["content"] for delta in deltas) == "<b>bold</b> and {braces}"


def test_named_stream_sends_arguments_as_they_come():
    calling = chat_request(
        tool_choice={"type": "function", "function": {"name": "get_time"}}
    ).tool_calling()
    first, second = stream(calling, ["{", "}"])
    assert first["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{"}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}


# Qwen2.5's way of showing tools and earlier calls, cut down.
TOOL_TEMPLATE = (
    "{%- if tools %}<tools>{% for tool in tools %}{{ tool.function.name }};{% endfor %}</tools>"
    "{% endif %}"
    "{%- for message in messages %}{{ message.role }}:{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}"
    "<tool_call>{{ call.function.name }} {{ call.function.arguments | tojson }}</tool_call>"
    "{%- endfor %}{% if message.tool_call_id %}[{{ message.tool_call_id }}]{% endif %}|"
    "{%- endfor %}"
)


def test_tools_and_tool_turns_reach_the_chat_template(llama_path, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((llama_path / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOOL_TEMPLATE}))
    tokenizer = ModelTokenizer(tmp_path)
    request = chat_request(
        messages=[
            {"role": "user", "content": "time?"},
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
    )
    rendered = tokenizer.apply_chat_template(
        [message.template_message() for message in request.messages],
        tools=request.tool_calling().template_tools(),
    )
    assert rendered == (
        "<tools>get_weather;get_time;</tools>user:time?|"
        'assistant:<tool_call>get_time {"zone": "UTC"}</tool_call>|tool:12:00[call_1]|'
    )


def test_required_stream_sends_each_calls_arguments_as_they_come():
    """Split anywhere, even inside the name or an escape, the deltas add up to the calls of
    the whole reply; braces and quotes inside strings do not end the arguments."""
    calling = chat_request(tool_choice="required").tool_calling()
    text = (
        '[{"name": "get_weather", "parameters": {"place": "O}s\\"l{o", "n": [1, {"a": 2}]}}, '
        '{"name": "get_time", "parameters": {}}]'
    )
    whole = calling.reply(text)
    assert [call.name for call in whole.tool_calls] == ["get_weather", "get_time"]
    deltas = stream(calling, list(text))
    calls: dict[int, dict] = {}
    for delta in deltas:
        [call] = delta["tool_calls"]
        entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
        entry["name"] += call["function"].get("name", "")
        entry["arguments"] += call["function"]["arguments"]
    assert [ParsedToolCall(**calls[index]) for index in sorted(calls)] == whole.tool_calls
    # The first call's arguments went out before the reply was complete.
    assert len(deltas) > 4

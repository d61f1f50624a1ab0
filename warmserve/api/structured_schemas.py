"""Request fields that constrain the output: OpenAI's `response_format`, `tools` and
`tool_choice`, and vLLM's `guided_json`, `guided_regex` and `guided_choice`.

Each becomes at most one StructuredOutput, the grammar the worker enforces (xgrammar there;
this process has no torch, so schemas are checked here against the JSON Schema meta-schema, and
a schema that is valid yet cannot be compiled is refused by the worker).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from warmserve.config import StructuredOutput

MAX_CHOICES = 1024


def _valid_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise PydanticCustomError(
            "json_schema",
            "not a valid JSON schema{at}: {message}",
            {"at": f" at {where!r}" if where else "", "message": exc.message},
        ) from None
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(_valid_json_schema)]


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow BaseModel.schema; the alias keeps OpenAI's spelling on the wire.
    json_schema: JsonSchema = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "json_schema", "json_schema is required when type is 'json_schema'"
            )
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput("json_object", field="response_format")
        if self.type == "json_schema":
            schema = json.dumps(self.json_schema.json_schema)
            return StructuredOutput("json_schema", schema, "response_format.json_schema.schema")
        return None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}}


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, encoded


class MessageToolCall(BaseModel):
    """A call in an assistant message: in a reply, or in the history a request sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_call(self) -> dict[str, Any]:
        """As chat templates take it: arguments decoded (templates write them with tojson)."""
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": arguments},
        }


class StructuredRequest(BaseModel):
    """The fields shared by completions and chat completions."""

    response_format: ResponseFormat | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredRequest:
        if isinstance(self.guided_json, str):
            try:
                schema = json.loads(self.guided_json)
            except json.JSONDecodeError as exc:
                raise PydanticCustomError(
                    "guided_json", "guided_json: not valid JSON ({error})", {"error": str(exc)}
                ) from None
            if not isinstance(schema, dict):
                raise PydanticCustomError("guided_json", "guided_json must be a JSON object")
            self.guided_json = _valid_json_schema(schema)
        given = [name for name in self._constraint_fields() if getattr(self, name) is not None]
        if len(given) > 1:
            raise PydanticCustomError(
                "structured_output",
                "{fields} constrain the output each: send one of them",
                {"fields": " and ".join(given)},
            )
        return self

    def _constraint_fields(self) -> list[str]:
        fields = ["guided_json", "guided_regex", "guided_choice"]
        if self.response_format is not None and self.response_format.type != "text":
            fields.insert(0, "response_format")
        return fields

    def structured_output(self) -> StructuredOutput | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.structured_output()
        if self.guided_json is not None:
            return StructuredOutput("json_schema", json.dumps(self.guided_json), "guided_json")
        if self.guided_regex is not None:
            return StructuredOutput("regex", self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return StructuredOutput("choice", json.dumps(self.guided_choice), "guided_choice")
        return None

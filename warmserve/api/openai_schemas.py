"""OpenAI request bodies for /v1/completions and /v1/chat/completions (openai_responses has the
answers).

Requests are validated here so that a bad field is a 400 naming that field; anything warmserve
cannot honour (best_of > n, suffix, tools, ...) is refused rather than ignored, and so is a field
neither OpenAI nor vLLM defines (a misspelt `max_token`), as OpenAI refuses it.

Log-probabilities (`logprobs`, `top_logprobs`) are vLLM's default "raw_logprobs": the
log-softmax of the model's logits as the model computed them, before logit_bias, penalties,
temperature and top-k/top-p/min-p. They describe the model, not the sampler: a token drawn at
temperature 0.5 reports the same log-probability as at temperature 1. A structured-output
request's grammar mask does apply first, as in vLLM: tokens the grammar forbids report -9999.
Sampling fields follow vLLM: `n` choices are independent requests (seeded `seed + index` when a
seed is given); a list of prompts gives one choice per prompt and sample, prompt-major. The fields
that constrain the output (response_format, tools, guided_*) are in structured_schemas.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from warmserve.api.chat_template_options import ChatTemplateOptions
from warmserve.api.request_fields import (
    TOKEN_ID_MAX,
    UNSUPPORTED_UNLESS,
    Text,
    encodable,
    logit_bias_pairs,
    prompts,
)
from warmserve.api.structured_schemas import (
    MessageToolCall,
    NamedToolChoice,
    StructuredRequest,
    Tool,
    ToolChoice,
)
from warmserve.api.tool_calls import ToolCalling
from warmserve.config import MAX_LOGPROBS, ConfigError, SamplingParams, StructuredOutput
from warmserve.controller.registry import parse_keep_alive

# OpenAI's default for /v1/completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16
# OpenAI's chat default is "up to the context window"; a runaway default answer would hold a
# worker for minutes, so warmserve stops at this many tokens unless asked for more.
CHAT_DEFAULT_MAX_TOKENS = 256
# No model's context is this long: a larger max_tokens is a client bug, not a request.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 16
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

# OpenAI's bound on n; it bounds the choices of a request with several prompts too.
MAX_CHOICES = 128
# Request fields that the model's generation_config.json sets when a request leaves them out (as
# vLLM's `--generation-config auto`): request field -> generation_config.json field. Its
# `max_new_tokens` is the default `max_tokens` in the same way.
MODEL_DEFAULT_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def _text_content(value: Any) -> Any:
    """Message content as one string; a list of text parts is joined with newlines."""
    if value is None or isinstance(value, str):
        return encodable(value or "")
    if not isinstance(value, list):
        raise PydanticCustomError("content", "content must be a string or a list of text parts")
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise PydanticCustomError(
                "content", "only text content parts are supported, got '{kind}'", {"kind": kind}
            )
        if not isinstance(part.get("text"), str):
            raise PydanticCustomError("content", "a text content part needs a string 'text'")
        texts.append(encodable(part["text"]))
    return "\n".join(texts)


def _keep_alive_seconds(value: Any) -> Any:
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ConfigError as exc:
        raise PydanticCustomError("keep_alive", str(exc)) from None


# Ollama's keep_alive: seconds, or a duration such as "30s", "5m", "1h"; 0 unloads the model
# right after the request, -1 (any negative) keeps it loaded.
KeepAlive = Annotated[
    float | None,
    BeforeValidator(_keep_alive_seconds, json_schema_input_type=float | str | None),
]


class StreamOptions(BaseModel):
    include_usage: bool = False


Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class GenerationRequest(StructuredRequest):
    """Fields shared by completions and chat completions."""

    # Undeclared fields are kept so that the validator can name them in its refusal.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    # OpenAI's newer name for max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=TOKEN_ID_MAX)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Text | list[Text] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[
        list[tuple[Annotated[int, Field(ge=0)], Bias]] | None,
        BeforeValidator(logit_bias_pairs, json_schema_input_type=dict[str, float] | None),
    ] = None
    # Names the end user to OpenAI; it changes nothing here.
    user: str | None = None
    # vLLM extensions.
    stop_token_ids: list[Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]] | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    return_tokens_as_token_ids: bool | None = False
    # Ollama extension.
    keep_alive: KeepAlive = None

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self) -> GenerationRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise PydanticCustomError(
                "max_completion_tokens",
                "max_completion_tokens and max_tokens are the same limit: give one, or equal values",
            )
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options needs stream: true")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError(
                "stop", "at most {limit} stop sequences", {"limit": MAX_STOP_SEQUENCES}
            )
        for name, value in (self.model_extra or {}).items():
            if name not in UNSUPPORTED_UNLESS:
                raise PydanticCustomError(
                    "unknown", "{name}: unrecognized request field", {"name": name}
                )
            if value not in UNSUPPORTED_UNLESS[name]:
                raise PydanticCustomError(
                    "unsupported", "{name} is not supported by warmserve", {"name": name}
                )
        return self

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_samples(self) -> int:
        return self.n or 1

    def sampling_params(
        self,
        default_max_tokens: int,
        num_logprobs: int | None = None,
        model_defaults: dict | None = None,
    ) -> SamplingParams:
        """`num_logprobs`: most likely alternatives to report per token; None: no
        log-probabilities. `model_defaults` (the model's generation_config.json, see
        MODEL_DEFAULT_FIELDS) fill what the request leaves unset."""
        model_defaults = model_defaults or {}

        def chosen(field: str, fallback):
            value = getattr(self, field)
            if value is not None:
                return value
            return model_defaults.get(MODEL_DEFAULT_FIELDS[field], fallback)

        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        max_tokens = (
            self.max_completion_tokens or self.max_tokens or model_defaults.get("max_new_tokens")
        )
        return SamplingParams(
            max_tokens=max_tokens or default_max_tokens,
            temperature=chosen("temperature", 1.0),
            top_p=chosen("top_p", 1.0),
            top_k=chosen("top_k", 0) or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logit_bias=tuple(self.logit_bias or ()),
            min_tokens=self.min_tokens or 0,
            repetition_penalty=chosen("repetition_penalty", 1.0),
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            min_p=chosen("min_p", 0.0) or 0.0,
            logprobs=num_logprobs,
            structured_output=self.structured_output(),
        )


class CompletionRequest(GenerationRequest):
    prompt: Annotated[
        list[str | list[int]],
        BeforeValidator(
            prompts, json_schema_input_type=str | list[int] | list[str] | list[list[int]]
        ),
    ]
    # OpenAI's legacy shape: how many most likely tokens to report with each token (with echo,
    # with each prompt token too).
    logprobs: LogprobCount | None = None
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @model_validator(mode="after")
    def _check_choices(self) -> CompletionRequest:
        if self.best_of not in (None, self.num_samples):
            raise PydanticCustomError(
                "best_of", "best_of must equal n: warmserve returns every sample it draws"
            )
        if len(self.prompt) * self.num_samples > MAX_CHOICES:
            raise PydanticCustomError(
                "n", "prompts times n must be at most {limit}", {"limit": MAX_CHOICES}
            )
        return self


class ChatMessage(BaseModel):
    role: Text = Field(min_length=1)
    # null (an assistant turn that only calls tools) is rendered as "".
    content: Annotated[str, BeforeValidator(_text_content)] = ""
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: Text | None = None  # a tool turn: the call it answers

    def template_message(self) -> dict:
        message: dict = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.template_call() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(GenerationRequest, ChatTemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: LogprobCount | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise PydanticCustomError("tool_choice", "tool_choice needs tools")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("tools", "tools: each function needs its own name")
        named = isinstance(self.tool_choice, NamedToolChoice)
        if named and self.tool_choice.function.name not in names:
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice: no tool is named '{name}'",
                {"name": self.tool_choice.function.name},
            )
        constrained = StructuredRequest.structured_output(self) is not None
        if (named or self.tool_choice == "required") and constrained:
            raise PydanticCustomError(
                "tool_choice",
                "a forced tool_choice constrains the output: it cannot be combined with "
                "response_format or guided_*",
            )
        return self

    def tool_calling(self) -> ToolCalling:
        return ToolCalling(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_output(self) -> StructuredOutput | None:
        forced = self.tool_calling().structured_output()
        return forced if forced is not None else super().structured_output()

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

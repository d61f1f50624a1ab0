"""Request fields that need more than a type: text a tokenizer can take, prompts in OpenAI's
several forms, logit_bias keyed by token-id strings; and the fields warmserve refuses."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

# Token ids and top_k travel to the workers as 32-bit integers at most; no vocabulary is larger.
TOKEN_ID_MAX = 2**31 - 1

# OpenAI and vLLM fields warmserve does not implement, with the values that ask for nothing.
# Any other field that the request classes (openai_schemas) do not declare is refused as unknown.
UNSUPPORTED_UNLESS = {
    "suffix": (None, ""),
    # /v1/completions only: chat declares tools, tool_choice and parallel_tool_calls.
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "guided_grammar": (None,),
    "prompt_logprobs": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "store": (None, False),
    "echo": (None, False),  # vLLM's chat echo; /v1/completions' echo is implemented
    "chat_template": (None,),
    "documents": (None,),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "truncate_prompt_tokens": (None,),
    "priority": (None, 0),
    "structured_outputs": (None,),
    "guided_decoding_backend": (None,),
}


def encodable(text: str) -> str:
    """JSON may escape lone surrogates ("\\ud800"), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "text", "text must be valid Unicode (no lone surrogates)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


def _token_ids(value: list) -> list[int]:
    if any(item < 0 for item in value):
        raise PydanticCustomError("prompt", "token ids must be non-negative integers")
    return value


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def prompts(value: Any) -> Any:
    """A string, a list of token ids, or a non-empty list of either: one choice per prompt."""
    if isinstance(value, str):
        return [encodable(value)]
    if not isinstance(value, list) or not value:
        raise PydanticCustomError(
            "prompt", "prompt must be a non-empty string or a non-empty list of token ids"
        )
    if _is_token_ids(value):
        return [_token_ids(value)]
    prompts = []
    for item in value:
        if isinstance(item, str):
            prompts.append(encodable(item))
        elif _is_token_ids(item) and item:
            prompts.append(_token_ids(item))
        else:
            raise PydanticCustomError(
                "prompt",
                "prompt must be a string, a list of token ids, or a list of non-empty strings "
                "or token-id lists",
            )
    return prompts


def logit_bias_pairs(value: Any) -> Any:
    """OpenAI's map of token ids (JSON keys, so strings) to biases, as (id, bias) pairs."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PydanticCustomError("logit_bias", "logit_bias must map token ids to biases")
    pairs = []
    for key, bias in value.items():
        token = str(key).strip()
        if not token.isdecimal() or int(token) > TOKEN_ID_MAX:
            raise PydanticCustomError(
                "logit_bias", "logit_bias keys must be token ids, got {key!r}", {"key": key}
            )
        pairs.append((int(token), bias))
    return pairs

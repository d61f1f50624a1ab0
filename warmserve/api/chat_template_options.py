"""vLLM's chat template fields, taken by /v1/chat/completions and by /tokenize for a chat."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError

# Template variables a request's chat_template_kwargs may not set: the server sets them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}
)


class ChatTemplateOptions(BaseModel):
    # Extra template variables (e.g. Qwen3's enable_thinking), and continuing the last
    # (assistant) message instead of starting a new one.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _check_template_options(self) -> ChatTemplateOptions:
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(self.chat_template_kwargs or {}))
        if reserved:
            raise PydanticCustomError(
                "chat_template_kwargs",
                "chat_template_kwargs may not set {names}: use the request's own fields",
                {"names": ", ".join(reserved)},
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise PydanticCustomError(
                "continue_final_message",
                "continue_final_message needs add_generation_prompt: false",
            )
        return self

    def template_options(self) -> dict:
        """Keyword arguments of ModelTokenizer.apply_chat_template / chat_token_ids."""
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "template_kwargs": self.chat_template_kwargs,
        }

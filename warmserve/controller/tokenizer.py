"""A model's text side: its tokenizer, chat template, special tokens and sampling defaults.

Read from a Hugging Face folder (tokenizer.json; the chat template from chat_template.jinja, the
layout transformers 5 writes, or tokenizer_config.json; generation_config.json) or from a GGUF
file's metadata.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer

from warmserve.controller.chat_template import ChatTemplateError, render_chat
from warmserve.loader.checkpoint import CheckpointError, read_json
from warmserve.loader.gguf_metadata import is_gguf_path

# The named special tokens transformers hands a chat template (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# generation_config.json fields applied where a request sets nothing, as vLLM's
# `--generation-config auto` does (the schema module lists which request field each fills).
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens")

__all__ = ["ChatTemplateError", "ModelTokenizer"]


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value if isinstance(value, str) else None


def _select_template(template, has_tools: bool) -> str | None:
    """A config may hold several named templates (a list of {"name", "template"}); transformers
    takes "tool_use" when tools are given, "default" otherwise."""
    if isinstance(template, list):
        template = {entry.get("name"): entry.get("template") for entry in template}
    if isinstance(template, dict):
        if has_tools and "tool_use" in template:
            return template["tool_use"]
        return template.get("default")
    return template


def read_generation_defaults(path: Path) -> dict:
    if not path.is_file():
        return {}
    config = read_json(path)
    return {
        field: config[field]
        for field in GENERATION_DEFAULT_FIELDS
        if isinstance(config.get(field), (int, float)) and not isinstance(config[field], bool)
    }


class ModelTokenizer:
    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if is_gguf_path(model_path):
            from warmserve.loader.gguf_tokenizer import read_gguf_tokenizer

            parts = _cached(read_gguf_tokenizer, model_path)
            self.tokenizer = parts.tokenizer
            self.chat_template = parts.chat_template
            special = parts.special_tokens
            self.generation_defaults: dict = {}
        else:
            self.tokenizer = _cached(_load_tokenizer_json, model_path / "tokenizer.json")
            config = _read_optional_json(model_path / "tokenizer_config.json")
            legacy_special = _read_optional_json(model_path / "special_tokens_map.json")
            special = {
                name: _token_text(config.get(name, legacy_special.get(name)))
                for name in NAMED_SPECIAL_TOKENS
            }
            self.chat_template = _read_chat_template(model_path, config)
            self.generation_defaults = read_generation_defaults(
                model_path / "generation_config.json"
            )
        # transformers passes only the special tokens the tokenizer has: a template's
        # `bos_token is defined` test must see the same.
        self.special_tokens = {name: text for name, text in special.items() if text is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.vocab_size = self.tokenizer.get_vocab_size()
        # Each token's text decoded alone, as streams ask for it (most tokens, several times).
        self._token_texts: dict[tuple[int, bool], str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(token_ids) == 1:
            key = (token_ids[0], skip_special_tokens)
            text = self._token_texts.get(key)
            if text is None:
                text = self._token_texts[key] = self.tokenizer.decode(
                    token_ids, skip_special_tokens=skip_special_tokens
                )
            return text
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> str:
        template = _select_template(self.chat_template, tools is not None)
        if not template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        return render_chat(
            template,
            messages,
            self.special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            template_kwargs=template_kwargs,
        )

    def chat_token_ids(self, messages: list[dict], **options) -> list[int]:
        """The rendered chat as token ids. Like transformers and vLLM, the text is encoded
        without adding special tokens: the template writes the ones the model expects (a BOS
        added here as well would be a second one)."""
        return self.encode(self.apply_chat_template(messages, **options), add_special_tokens=False)


def _cached(read, path: Path):
    """`read(path)`, built once per version of the file: a request for a registered model that
    is not loaded opens its tokenizer, and a large vocabulary takes ~0.1-0.5 s to build. The
    tokenizer is only read from (encode, decode), so one object serves every caller."""
    try:
        stat = path.stat()
    except OSError:
        return read(path)  # which names the missing file
    return _cached_by_version(read, path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_by_version(read, path: Path, size: int, mtime_ns: int):
    return read(path)


def _load_tokenizer_json(path: Path) -> Tokenizer:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a plain Exception
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc


def _read_optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _read_chat_template(model_dir: Path, config: dict):
    """chat_template.jinja (and additional_chat_templates/*.jinja) take priority over
    tokenizer_config.json's entry, as in transformers."""
    templates = {}
    single = model_dir / "chat_template.jinja"
    if single.is_file():
        templates["default"] = _read_text(single)
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = _read_text(file)
    if not templates:
        return config.get("chat_template")
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc

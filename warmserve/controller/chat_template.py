"""Renders a chat template exactly as transformers' `apply_chat_template` does.

The Jinja environment mirrors transformers' (`utils/chat_template_utils.py`): a sandbox with
`trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension and the `{% generation %}` tag, its
`tojson` filter (no HTML escaping, with `indent`/`separators`/`sort_keys`), and the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`. The named special tokens (bos_token,
eos_token, ...) are template variables, and `continue_final_message` cuts the rendered text after
the last message's content as transformers does.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

# Marks the end of the message to continue; transformers uses the same tag.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    pass


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body: transformers uses the tag to
    find assistant tokens for training masks, which serving has no use for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without handing the template the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore attributes (no reach into CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_attribute(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _check_attribute(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot set underscore attributes on a namespace ({name!r})"
        )


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a model's template is compiled once, not per request)."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(source)


def render_chat(
    source: str,
    messages: list[dict],
    special_tokens: dict[str, str],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> str:
    """The rendered prompt. `template_kwargs` (a request's chat_template_kwargs) may override
    the special tokens, as keyword arguments to transformers' apply_chat_template do."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt cannot both be true"
        )
    messages = [dict(message) for message in messages]
    final_content = ""
    if continue_final_message:
        final_content = messages[-1].get("content")
        if not isinstance(final_content, str):
            raise ChatTemplateError("continue_final_message needs a final message with content")
        messages[-1]["content"] = final_content + CONTINUE_TAG
    try:
        rendered = compile_template(source).render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**special_tokens, **(template_kwargs or {})},
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, final_content)
    return rendered


def _cut_after_final_message(rendered: str, final_content: str) -> str:
    tag = CONTINUE_TAG.strip()
    if final_content.strip() not in rendered or tag not in rendered:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not render the final message as is"
        )
    tag_at = rendered.rindex(tag)
    if rendered[tag_at : tag_at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:tag_at]
    # The template trimmed the message's trailing space (and so the tag's).
    return rendered[:tag_at].rstrip()

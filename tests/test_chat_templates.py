"""Chat templates render exactly as transformers' apply_chat_template renders them, and the
rendered chat encodes to the same token ids (one BOS, whoever writes it)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

from warmserve.controller.tokenizer import ChatTemplateError, ModelTokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief & <polite>."},
    {"role": "user", "content": "Où est le café? 你好"},
    {"role": "assistant", "content": "Ici."},
    {"role": "user", "content": "Merci!"},
]

# Llama 3.2's way: the template writes BOS itself and dates the system turn with strftime_now.
BOS_AND_DATE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\nToday Date: ' + date_string + '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's switch: chat_template_kwargs {"enable_thinking": false} writes an empty think block.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
# transformers' own helpers: tojson's options (no HTML escaping, non-ASCII kept), loop controls,
# namespaces, dict(), the {% generation %} tag and whitespace control.
HELPERS_TEMPLATE = """
{%- set ns = namespace(shown=0) %}
{%- for message in messages %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
    {%- if message.role == 'assistant' %}
        {%- generation %}{{ message | tojson }}{% endgeneration %}
    {%- else %}
        {{ message | tojson(indent=2, sort_keys=True) }}
    {%- endif %}
    {%- set ns.shown = ns.shown + 1 %}
{% endfor %}
shown={{ ns.shown }} {{ dict(a=1) | tojson(separators=(',', ':')) }} eos={{ eos_token }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""


def tokenizer_dir(tmp_path, llama_path, template: str, *, jinja_file: bool = False, bos=False):
    """A copy of the fixture tokenizer with `template`; with `bos`, the tokenizer adds
    <|endoftext|> in front of every encoding, as Llama's does with its BOS."""
    shutil.copy(llama_path / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((llama_path / "tokenizer_config.json").read_text())
    if jinja_file:
        del config["chat_template"]
        (tmp_path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if bos:
        tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
        tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def assert_renders_like_transformers(path, messages=MESSAGES, **options):
    ours = ModelTokenizer(path)
    reference = AutoTokenizer.from_pretrained(path)
    template_kwargs = options.pop("template_kwargs", {})
    for add_generation_prompt in (False, True):
        expected = reference.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
            **options,
        )
        rendered = ours.apply_chat_template(
            messages, add_generation_prompt, template_kwargs=template_kwargs, **options
        )
        assert rendered == expected
        expected_ids = reference.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs, **options
        )["input_ids"]
        assert ours.chat_token_ids(
            messages,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
            **options,
        ) == list(expected_ids)
    return ours


def test_a_template_that_writes_bos_gets_one_bos(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, BOS_AND_DATE_TEMPLATE, bos=True)
    ours = assert_renders_like_transformers(path)
    token_ids = ours.chat_token_ids(MESSAGES)
    assert token_ids[0] == 0 and token_ids[1] != 0
    # The tokenizer adds a BOS of its own to plain text: the chat must not get it twice.
    assert ours.encode("Hello")[0] == 0


def test_strftime_now_and_date_string_override(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, BOS_AND_DATE_TEMPLATE)
    ours = assert_renders_like_transformers(path)
    assert "Today Date: 01 Jan 2000" in ours.apply_chat_template(
        MESSAGES, template_kwargs={"date_string": "01 Jan 2000"}
    )


def test_chat_template_kwargs_reach_the_template(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, THINKING_TEMPLATE)
    ours = assert_renders_like_transformers(path, template_kwargs={"enable_thinking": False})
    assert ours.apply_chat_template(MESSAGES, template_kwargs={"enable_thinking": False}).endswith(
        "<think>\n\n</think>\n\n"
    )
    assert "<think>" not in ours.apply_chat_template(MESSAGES)


def test_transformers_helpers_from_chat_template_jinja(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, HELPERS_TEMPLATE, jinja_file=True)
    ours = assert_renders_like_transformers(path)
    rendered = ours.apply_chat_template(MESSAGES)
    assert "<polite>" in rendered and "café" in rendered and "shown=3" in rendered


def test_continue_final_message_like_transformers(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, THINKING_TEMPLATE)
    messages = [*MESSAGES[:2], {"role": "assistant", "content": "Le café est "}]
    ours = ModelTokenizer(path)
    reference = AutoTokenizer.from_pretrained(path)
    rendered = ours.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == reference.apply_chat_template(
        messages, tokenize=False, continue_final_message=True
    )
    assert rendered.endswith("<|im_start|>assistant\nLe café est ")
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        ours.apply_chat_template(messages, continue_final_message=True)


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, "")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "{{ tools | length }} tools"},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = ModelTokenizer(path)
    assert ours.apply_chat_template(MESSAGES) == "plain"
    assert ours.apply_chat_template(MESSAGES, tools=[{"type": "function"}]) == "1 tools"


def test_generation_config_sampling_defaults(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, THINKING_TEMPLATE)
    (path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True})
    )
    assert ModelTokenizer(path).generation_defaults == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
    }


def test_a_tokenizer_is_built_once_per_version_of_its_file(tmp_path, llama_path):
    path = tokenizer_dir(tmp_path, llama_path, THINKING_TEMPLATE)
    assert ModelTokenizer(path).tokenizer is ModelTokenizer(path).tokenizer
    first = ModelTokenizer(path).tokenizer
    rewritten = path / "tokenizer.json"
    rewritten.write_text(rewritten.read_text())
    os.utime(rewritten, ns=(1, 1))  # another version of the file
    assert ModelTokenizer(path).tokenizer is not first

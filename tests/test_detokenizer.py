"""Incremental detokenization and stop strings, with the fixture's byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from warmserve.controller.detokenizer import IncrementalDetokenizer
from warmserve.controller.tokenizer import ChatTemplateError, ModelTokenizer

REPLACEMENT = "\ufffd"
MULTILINGUAL = (
    "Café au lait, naïve façade — Grüße aus München! ¿Dónde está? "
    "東京タワーと富士山。你好，世界！今天天气很好。안녕하세요, 세계! Привет, мир. Καλημέρα. "
    "Emoji: 🙂🚀👍🏽🇫🇷 and ❤️ — symbols € £ ¥ © ≈ ≠ ∞ … « » “quoted” ‘single’. "
) * 3


@pytest.fixture(scope="module")
def tokenizer(llama_path) -> ModelTokenizer:
    return ModelTokenizer(llama_path)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """The text released after each token; the last token ends the request."""
    last = len(token_ids) - 1
    return [
        detokenizer.add([token], finished=index == last) for index, token in enumerate(token_ids)
    ]


def test_the_text_splits_characters_over_tokens(tokenizer):
    # Otherwise the tests below would not exercise incomplete characters.
    token_ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    assert tokenizer.decode(token_ids) == MULTILINGUAL
    pieces = [tokenizer.decode([token]) for token in token_ids]
    assert sum(REPLACEMENT in piece for piece in pieces) > 50


@pytest.mark.parametrize("prompt", ["", "Prompt: ", "你好"])
def test_deltas_add_up_to_the_decoded_text_and_hold_no_broken_characters(tokenizer, prompt):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    token_ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    streamed = ""
    for index, token in enumerate(token_ids):
        delta = detokenizer.add([token], finished=index == len(token_ids) - 1)
        assert REPLACEMENT not in delta
        streamed += delta
        decoded = tokenizer.decode(token_ids[: index + 1])
        assert decoded.startswith(streamed)
        # Only a token that ends inside a character waits for the tokens that complete it.
        if REPLACEMENT not in decoded:
            assert streamed == decoded
    assert streamed == MULTILINGUAL


def test_tokens_given_several_at_a_time_give_the_same_text(tokenizer):
    token_ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    chunks = [token_ids[start : start + 3] for start in range(0, len(token_ids), 3)]
    deltas = [
        detokenizer.add(chunk, finished=index == len(chunks) - 1)
        for index, chunk in enumerate(chunks)
    ]
    assert "".join(deltas) == MULTILINGUAL


def test_arbitrary_token_sequences_stream_what_decode_gives(tokenizer):
    # A model may generate byte sequences that are not UTF-8; the stream still ends up equal
    # to decoding all tokens at once, replacement characters included.
    rng = random.Random(0)
    for _ in range(50):
        token_ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(40)]
        detokenizer = IncrementalDetokenizer(tokenizer, [])
        assert "".join(stream(detokenizer, token_ids)) == tokenizer.decode(token_ids)


def test_special_tokens_are_skipped_unless_asked_for(tokenizer):
    token_ids = tokenizer.encode("Hi<|im_end|> there", add_special_tokens=False)
    assert tokenizer.token_id("<|im_end|>") in token_ids
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), token_ids)) == "Hi there"
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(stream(keeping, token_ids)) == "Hi<|im_end|> there"


@pytest.mark.parametrize(
    "stop",
    [
        "世界",  # two characters of three bytes each, over several tokens
        "lait, na",  # several ASCII tokens
        "🚀👍",
        "Grüße",
    ],
)
def test_text_stops_before_a_stop_string_that_spans_tokens(tokenizer, stop):
    token_ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    assert not any(stop in tokenizer.decode([token]) for token in token_ids)
    expected = MULTILINGUAL[: MULTILINGUAL.index(stop)]

    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=(stop, "never appears"))
    streamed = ""
    for index, token in enumerate(token_ids):
        streamed += detokenizer.add([token], finished=index == len(token_ids) - 1)
        # Never a character past the text that precedes the stop string.
        assert expected.startswith(streamed)
        if detokenizer.stop_matched is not None:
            break
    assert streamed == expected
    assert detokenizer.stop_matched == stop
    # The engine stops the request here; tokens it already produced change nothing.
    assert detokenizer.add(token_ids[:5], finished=True) == ""


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    token_ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=("four", "two", "three"))
    assert "".join(detokenizer.add([token]) for token in token_ids) == "one "
    assert detokenizer.stop_matched == "two"


def test_text_that_could_start_a_stop_string_is_held_back_until_ruled_out(tokenizer):
    # The last len("END!") - 1 characters wait: they might be where the stop string begins.
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=("END!",))
    assert detokenizer.add(tokenizer.encode("The E", add_special_tokens=False)) == "Th"
    assert detokenizer.add(tokenizer.encode("N", add_special_tokens=False)) == "e"
    assert detokenizer.add(tokenizer.encode("D?", add_special_tokens=False)) == " E"
    assert detokenizer.add([], finished=True) == "ND?"
    assert detokenizer.stop_matched is None


def test_a_stop_string_in_the_prompt_does_not_stop_the_output(tokenizer):
    prompt_ids = tokenizer.encode("Say STOP", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, stop=("STOP",))
    output_ids = tokenizer.encode(" and go", add_special_tokens=False)
    assert "".join(stream(detokenizer, output_ids)) == " and go"
    assert detokenizer.stop_matched is None


def test_stop_strings_count_only_after_min_tokens(tokenizer):
    first = tokenizer.encode("one two", add_special_tokens=False)
    rest = tokenizer.encode(" one two three", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=("two",), min_tokens=len(first))
    assert "".join(detokenizer.add([token]) for token in first + rest) == "one two one "
    assert detokenizer.stop_matched == "two"


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Où est le café? 你好"},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOù est le café? 你好<|im_end|>\n"
)


def test_chat_template_renders_like_transformers(tokenizer, llama_path):
    reference = AutoTokenizer.from_pretrained(llama_path)
    for add_generation_prompt in (False, True):
        rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt)
        assert rendered == reference.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False) == CHATML
    assert tokenizer.apply_chat_template(MESSAGES) == CHATML + "<|im_start|>assistant\n"
    assert tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))[0] == tokenizer.token_id(
        "<|im_start|>"
    )


def test_chat_template_errors(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(ChatTemplateError, match="only user turns, please"):
        tokenizer.apply_chat_template(MESSAGES)
    tokenizer.chat_template = "{% for %}"
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        tokenizer.apply_chat_template(MESSAGES)
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template(MESSAGES)

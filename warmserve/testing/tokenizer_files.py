"""The tokenizer files of the random-weight checkpoints: a byte-level BPE trained on a small
corpus, with Qwen's special tokens at ids 0-2 and its chat template."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from warmserve.testing.corpus import TRAINING_TEXT

_ENDOFTEXT, _IM_START, _IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


# Trained first, so they take ids 0, 1 and 2 whatever the vocabulary size.
_SPECIAL_TOKENS = (_ENDOFTEXT, _IM_START, _IM_END)


_ENDOFTEXT_ID, _IM_END_ID = 0, 2


# Like Qwen's instruct models: a chat turn ends the generation at <|im_end|>; generation_config
# also stops at <|endoftext|>, which ends plain completions.
BOS_ID, EOS_ID, PAD_ID = _ENDOFTEXT_ID, _IM_END_ID, _ENDOFTEXT_ID


GENERATION_EOS_IDS = [_IM_END_ID, _ENDOFTEXT_ID]


# The corpus supports up to 1,782 tokens; real shapes get a tokenizer this big and leave the
# remaining embedding rows unused.
MAX_TOKENIZER_VOCAB = 1024


# Splits letters, single digits, punctuation runs and whitespace, as Qwen2's tokenizer does.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(
    path: str | os.PathLike, vocab_size: int, *, model_max_length: int = 2048
) -> None:
    """Write tokenizer.json and tokenizer_config.json of a byte-level BPE with exactly
    `vocab_size` tokens (at least 259; the corpus supports up to 1,782), with <|endoftext|>,
    <|im_start|> and <|im_end|> at ids 0, 1 and 2."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_trained_tokenizer_json(vocab_size), encoding="utf-8")
    tokenizer_config = {
        "bos_token": _ENDOFTEXT,
        "chat_template": _CHAT_TEMPLATE,
        # transformers would otherwise rewrite spaces around punctuation when decoding, and its
        # text would differ from the tokenizer's own.
        "clean_up_tokenization_spaces": False,
        "eos_token": _IM_END,
        "model_max_length": model_max_length,
        "pad_token": _ENDOFTEXT,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    write_json(directory / "tokenizer_config.json", tokenizer_config)


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    # Qwen2's pipeline exactly: transformers loads every qwen2 checkpoint with Qwen2Tokenizer,
    # which rebuilds this normalizer and pre-tokenizer around the file's vocabulary and merges,
    # so any other pipeline would tokenize differently there than the file says.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any text encodes, however rare its characters.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"cannot train a tokenizer of {vocab_size} tokens: the corpus gives "
            f"{tokenizer.get_vocab_size()} (the minimum is 256 bytes + {len(_SPECIAL_TOKENS)})"
        )
    return tokenizer.to_str()


def write_json(file_path: Path, content: dict) -> None:
    file_path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

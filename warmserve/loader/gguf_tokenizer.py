"""A `tokenizers.Tokenizer` built from a GGUF file's metadata, as transformers builds it
(integrations/gguf/gguf_tokenizer_mapping.py): byte-level BPE ("gpt2" vocabularies: GPT-2,
SmolLM, Llama 3, Qwen2 files), its control tokens special, its user-defined tokens whole, BOS/EOS
added where the file says so."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from warmserve.loader.checkpoint import CheckpointError
from warmserve.loader.gguf_metadata import (
    derived_file,
    is_gguf_path,
    read_gguf_header,
    write_atomically,
)

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# The split regexes of the pre-tokenizers named by tokenizer.ggml.pre, as transformers maps them;
# a name not here gets GPT-2's ByteLevel split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclass(frozen=True)
class GGUFTokenizerParts:
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... -> text


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (transformers' bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizerParts:
    header = read_gguf_header(
        path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    )
    metadata = header.metadata
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{header.path}: GGUF tokenizer {kind!r} is not supported (supported: 'gpt2', "
            "byte-level BPE)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise CheckpointError(f"{header.path}: GGUF metadata has no vocabulary or merges")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ")) for merge in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    special_tokens = {
        name: tokens[metadata[f"tokenizer.ggml.{key}"]]
        for name, key in SPECIAL_TOKEN_IDS.items()
        if isinstance(metadata.get(f"tokenizer.ggml.{key}"), int)
        and metadata[f"tokenizer.ggml.{key}"] < len(tokens)
    }
    _add_marked_tokens(tokenizer, tokens, metadata.get("tokenizer.ggml.token_type"), alphabet)
    tokenizer.add_special_tokens(
        [AddedToken(text, normalized=False, special=True) for text in special_tokens.values()]
    )
    _add_bos_eos(tokenizer, metadata, special_tokens)
    return GGUFTokenizerParts(tokenizer, metadata.get("tokenizer.chat_template"), special_tokens)


def _add_marked_tokens(tokenizer: Tokenizer, tokens: list, token_types, alphabet: set) -> None:
    """Control tokens become special; user-defined ones (like <think>) stay whole but are not
    special. A "control" token spelled outside the byte alphabet is a llama.cpp mislabel."""
    if not isinstance(token_types, list):
        return
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == CONTROL and set(token) <= alphabet
    ]
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == USER_DEFINED
    ]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)


def _add_bos_eos(tokenizer: Tokenizer, metadata: dict, special_tokens: dict[str, str]) -> None:
    bos = special_tokens.get("bos_token") if metadata.get("tokenizer.ggml.add_bos_token") else None
    eos = special_tokens.get("eos_token") if metadata.get("tokenizer.ggml.add_eos_token") else None
    if bos is None and eos is None:
        return
    pieces = [*(["$bos"] if bos else []), "$A", *(["$eos"] if eos else [])]
    used = [(text, tokenizer.token_to_id(text)) for text in (bos, eos) if text]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(pieces).replace("$bos", bos or "").replace("$eos", eos or ""),
        special_tokens=list(dict.fromkeys(used)),
    )


def tokenizer_json(model_path: Path) -> Path | None:
    """The model's tokenizer.json: the folder's own, or for a GGUF file one written once from
    its metadata into the user cache (structured output reads its vocabulary from it)."""
    if not is_gguf_path(model_path):
        path = model_path / "tokenizer.json"
        return path if path.is_file() else None
    target = derived_file(model_path, ".tokenizer.json")
    if not target.is_file():
        text = read_gguf_tokenizer(model_path).tokenizer.to_str()
        write_atomically(target, lambda handle: handle.write(text.encode("utf-8")))
    return target

"""Checkpoints for the serving benchmarks: random weights with a real model's shape, and a
tokenizer in which every token id has text.

The fixture builder's tokenizer has at most 1,024 tokens, so the ids a random 128k-vocabulary
model generates almost never decode to text, and an OpenAI stream carries nothing until one does:
the first streamed chunk would arrive long after the first token. A real model's tokens all have
text, so each benchmark checkpoint gets a word-level tokenizer with one word per id
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` keep ids 0-2); every generated token is then one
streamed chunk, as with a trained model. The printable ASCII characters come next, one token
each, so that a grammar can spell any JSON with them (`bench serve --json-schema`): with words
alone, a schema's opening brace had no token and every constrained request ended at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, models

from warmserve.loader.checkpoint import read_model_config
from warmserve.testing.checkpoints import ensure_checkpoint
from warmserve.testing.model_configs import SHAPES

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The tiny presets exist for every family; a benchmark names which one it means.
TINY_SHAPES = {"tiny": "qwen3", "tiny-llama": "llama", "tiny-opt": "opt"}
# Every real shape of the fixture builder belongs to exactly one family.
REAL_SHAPES = {
    name: next(iter(families)) for name, families in SHAPES.items() if not name.startswith("tiny")
}
SHAPE_NAMES = sorted({*TINY_SHAPES, *REAL_SHAPES})
# Above this many bytes of weights, write the checkpoint in shards as the Hub does.
SHARDED_SHAPES = {"llama-3.1-8b", "qwen3-8b"}


def bench_checkpoint(root: Path, shape: str, dtype: str, seed: int = 1) -> Path:
    """The checkpoint of `shape` under `root` (built once), with a full-vocabulary tokenizer."""
    if shape in TINY_SHAPES:
        family, preset = TINY_SHAPES[shape], "tiny"
    elif shape in REAL_SHAPES:
        family, preset = REAL_SHAPES[shape], shape
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")
    path = ensure_checkpoint(
        root / f"{shape}-{dtype}-seed{seed}",
        family,
        preset,
        dtype=dtype,
        seed=seed,
        sharded=shape in SHARDED_SHAPES,
    )
    vocab_size = read_model_config(path)[1]["vocab_size"]
    tokenizer_path = path / "tokenizer.json"
    if Tokenizer.from_file(str(tokenizer_path)).get_vocab_size() != vocab_size:
        staging = tokenizer_path.with_suffix(".json.partial")
        word_level_tokenizer(vocab_size).save(str(staging))
        os.replace(staging, tokenizer_path)
    return path


def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    characters = [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *characters])}
    vocab.update({f"w{index}": index for index in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def share_checkpoint(source: Path, target: Path) -> Path:
    """A second model folder with `source`'s files, hard-linked (symlinked across file systems)
    so that several models of one shape cost its bytes on disk once; the server sees separate
    checkpoints."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        link = target / file.name
        if not file.is_file() or (link.exists() and os.path.samefile(link, file)):
            continue
        link.unlink(missing_ok=True)  # a link to a file since replaced (the tokenizer)
        try:
            os.link(file, link)
        except OSError:
            link.symlink_to(file.resolve())
    return target

"""The benchmark checkpoints' tokenizer can spell what `bench serve --json-schema` asks for, so
that every constrained request runs its full length, as the unconstrained ones do."""

from __future__ import annotations

import json

import torch
import xgrammar

from warmserve.bench.checkpoints import word_level_tokenizer
from warmserve.bench.serve_plan import LONG_TEXT_FORMAT
from warmserve.engine.structured_output import tokenizer_info

VOCAB_SIZE = 2048


def test_the_long_text_schema_never_ends_and_never_runs_out_of_tokens(tmp_path):
    path = tmp_path / "tokenizer.json"
    word_level_tokenizer(VOCAB_SIZE).save(str(path))
    compiler = xgrammar.GrammarCompiler(tokenizer_info(path, VOCAB_SIZE, (0,)))
    schema = json.dumps(LONG_TEXT_FORMAT["json_schema"]["schema"])
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(schema, any_whitespace=False))
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB_SIZE)
    for _ in range(64):  # as a model would: the highest id the grammar allows, each step
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.arange(VOCAB_SIZE, dtype=torch.float32)[None]
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert logits[0, token] > float("-inf"), "no token may come next"
        assert token != 0, "the grammar let the stop token through"
        assert matcher.accept_token(token)
    assert not matcher.is_terminated()

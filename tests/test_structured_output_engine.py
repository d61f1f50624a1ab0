"""Structured output in the engine: whatever random weights prefer, the constrained output
follows its grammar, and the request ends where the grammar does."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from helpers import make_engine, random_prompts, run_to_completion
from tokenizers import Tokenizer

from warmserve.config import SamplingParams, StructuredOutput
from warmserve.engine.engine import RequestRejected
from warmserve.layers.grammar import apply_token_bitmask, apply_token_bitmask_with_torch

# The fixture tokenizer's stop tokens (EOS of the checkpoint).
IM_END, ENDOFTEXT = 2, 0
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "days", "sunny"],
}


@pytest.fixture(scope="module")
def engine(llama_path):
    return make_engine(llama_path, max_model_len=256)


@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return Tokenizer.from_file(str(llama_path / "tokenizer.json"))


def constrained(kind: str, spec: str = "", **options) -> SamplingParams:
    options = {"max_tokens": 120, "temperature": 1.0, **options}
    return SamplingParams(structured_output=StructuredOutput(kind, spec), **options)


def run(engine, params_by_id: dict[str, SamplingParams], seed: int = 0):
    prompts = random_prompts([6] * len(params_by_id), seed=seed)
    for (request_id, params), prompt in zip(params_by_id.items(), prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    return run_to_completion(engine)


def test_json_schema_output_validates_and_stops_at_the_grammars_end(engine, tokenizer):
    """Once the object is closed only EOS may follow: the request ends there, without a step
    to sample it."""
    params = {
        str(seed): constrained("json_schema", json.dumps(SCHEMA), seed=seed) for seed in range(4)
    }
    for completion in run(engine, params).values():
        assert completion.finish_reason == "stop"
        assert not {IM_END, ENDOFTEXT} & set(completion.token_ids)
        text = tokenizer.decode(completion.token_ids)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_grammar_that_may_go_on_ends_with_eos_or_length(engine, tokenizer):
    params = {
        str(seed): constrained("regex", "[a-z]+", seed=seed, max_tokens=30) for seed in range(4)
    }
    for completion in run(engine, params).values():
        *letters, last = completion.token_ids
        assert re.fullmatch("[a-z]*", tokenizer.decode(letters))
        if completion.finish_reason == "stop":
            assert last in (IM_END, ENDOFTEXT)
        else:
            assert completion.finish_reason == "length" and len(completion.token_ids) == 30


def test_constrained_and_free_requests_share_a_batch(engine, tokenizer):
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    regex = constrained("regex", r"[0-9]{3}-[a-z]{2}")
    completions = run(engine, {"free": free, "regex": regex, "free2": free}, seed=5)
    assert len(completions["free"].token_ids) == 8
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", tokenizer.decode(completions["regex"].token_ids))
    assert completions["regex"].finish_reason == "stop"


def test_choice_gives_one_of_the_choices(engine, tokenizer):
    choices = ["yes", "no", 'say "maybe"']
    params = {str(s): constrained("choice", json.dumps(choices), seed=s) for s in range(3)}
    for completion in run(engine, params, seed=2).values():
        assert tokenizer.decode(completion.token_ids) in choices


def test_greedy_json_object_is_an_object_or_cut_by_length(engine, tokenizer):
    """Greedy random weights may never close a string; what was produced is still a prefix of
    a JSON object that the grammar allowed."""
    completion = run(engine, {"obj": constrained("json_object", temperature=0.0)})["obj"]
    text = tokenizer.decode(completion.token_ids)
    assert text.startswith("{")
    if completion.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert completion.finish_reason == "length"


def test_a_grammar_that_does_not_compile_fails_its_request_alone(engine, tokenizer):
    broken = json.dumps({"type": "object", "properties": {"a": {"$ref": "#/missing"}}})
    engine.add_request("bad", [5, 6, 7], constrained("json_schema", broken))
    engine.add_request("good", [5, 6, 7], constrained("regex", "[a-z]{4}"))
    completions = run_to_completion(engine)
    assert list(completions) == ["good"]
    assert re.fullmatch("[a-z]{4}", tokenizer.decode(completions["good"].token_ids))
    [(request_id, error)] = engine.take_failures()
    assert request_id == "bad" and "json_schema cannot be compiled" in error
    assert "bad" not in engine.sequences


def test_a_model_without_tokenizer_json_refuses_structured_output(engine):
    tokenizer_dir, engine.tokenizer_dir = engine.tokenizer_dir, None
    try:
        with pytest.raises(RequestRejected, match="tokenizer.json"):
            engine.add_request("x", [5, 6, 7], constrained("regex", "a+"))
    finally:
        engine.tokenizer_dir = tokenizer_dir
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("steps", [0, 2], ids=["while-compiling", "while-running"])
def test_an_aborted_request_leaves_nothing_behind(engine, steps):
    engine.add_request("gone", [5, 6, 7], constrained("regex", "a{50}", max_tokens=60))
    for _ in range(steps):
        engine.step()
    assert engine.abort_request("gone")
    grammars = engine.structured_outputs
    assert "gone" not in grammars.matchers and "gone" not in grammars.compiling
    assert not engine.has_unfinished_requests()


def test_the_gpu_mask_path_masks_what_the_cpu_kernel_masks():
    """The torch ops the GPU path uses, run on the CPU, against xgrammar's CPU kernel, on logits
    made as the model's forward makes them (inference tensors, which refuse in-place updates
    outside inference mode)."""
    generator = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 4), dtype=torch.int32, generator=generator)
    with torch.inference_mode():
        logits = torch.randn(4, vocab, generator=generator)
        by_kernel, by_torch = logits.clone(), logits.clone()
    apply_token_bitmask(by_kernel, bitmask, [0, 2, 3])
    apply_token_bitmask_with_torch(by_torch, bitmask, [0, 2, 3])
    assert torch.equal(by_kernel, by_torch)
    assert torch.equal(by_kernel[1], logits[1])
    assert torch.isinf(by_kernel[0]).any() and not torch.isinf(by_kernel[0]).all()

"""Greedy output and logits of the engine equal transformers' on every supported variant."""

from __future__ import annotations

import pytest
import torch
from helpers import Completion, collect, make_engine, random_prompts
from transformers import AutoModelForCausalLM

from warmserve.config import SamplingParams
from warmserve.engine import model_runner

NEW_TOKENS = 32
# Around the 16-token block boundaries, up to 100 tokens.
PROMPT_LENGTHS = [1, 5, 15, 16, 17, 33, 64, 100]
# float32 logits of about unit scale: the two implementations differ by up to ~1e-5.
LOGITS_TOLERANCE = 5e-5

VARIANTS = [
    pytest.param("llama", "tiny", {}, id="llama"),
    pytest.param("mistral", "tiny", {}, id="mistral"),
    pytest.param("qwen2", "tiny", {}, id="qwen2"),
    pytest.param("qwen3", "tiny", {}, id="qwen3"),
    pytest.param("opt", "tiny", {}, id="opt"),
    pytest.param("llama", "tiny-llama3-rope", {}, id="llama3-rope"),
    pytest.param("llama", "tiny-mha", {}, id="llama-mha"),
    pytest.param("qwen3", "tiny-mha", {}, id="qwen3-mha"),
    pytest.param("llama", "tiny", {"tie_word_embeddings": True}, id="llama-tied"),
    pytest.param("opt", "tiny", {"tie_word_embeddings": False}, id="opt-untied"),
    pytest.param("opt", {"do_layer_norm_before": False}, {}, id="opt-post-norm"),
    pytest.param("opt", {"word_embed_proj_dim": 32}, {}, id="opt-project-in-out"),
    pytest.param(
        "opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}, {}, id="opt-350m-style"
    ),
    pytest.param("qwen2", "tiny", {"sharded": True}, id="qwen2-sharded"),
    # bfloat16 weights, computed in float32 by both.
    pytest.param("qwen3", "tiny", {"sharded": True, "dtype": "bfloat16"}, id="qwen3-bf16-sharded"),
    # Windows shorter than the sequences, so that attention outside them would change the output.
    pytest.param("mistral", {"sliding_window": 16}, {}, id="mistral-sliding-window"),
    pytest.param(
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        {},
        id="qwen2-sliding-window-layer-1",
    ),
]


def transformers_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the raw logits of each step."""
    input_ids = torch.tensor([prompt])
    result = model.generate(
        input_ids,
        # OPT's pad token id is 0, a token the prompts may hold: without an explicit mask,
        # transformers would mask those tokens out.
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return result.sequences[0, len(prompt) :].tolist(), torch.cat(result.logits)


def load_transformers_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # min_new_tokens would hold EOS back by setting its logits to -inf, which an engine request
    # with ignore_eos does not do; without EOS ids, generate simply runs max_new_tokens steps.
    model.generation_config.eos_token_id = None
    return model


def run_engine_recording_logits(engine, prompts, monkeypatch):
    """Runs all prompts together; returns each one's completion and the logits of its steps."""
    recorded: list[torch.Tensor] = []
    real_sample = model_runner.sample

    def recording_sample(logits, params, generators):
        recorded.append(logits.clone())
        return real_sample(logits, params, generators)

    monkeypatch.setattr(model_runner, "sample", recording_sample)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    completions: dict[str, Completion] = {}
    logits: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompts))}
    num_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        num_steps += 1
        step_logits = recorded.pop()
        for row, output in enumerate(outputs):
            logits[output.request_id].append(step_logits[row])
        collect(completions, outputs)
    # All prompts are prefilled in the first step and decode together afterwards.
    assert num_steps == NEW_TOKENS
    return completions, {key: torch.stack(rows) for key, rows in logits.items()}


@pytest.mark.parametrize(("family", "shape", "options"), VARIANTS)
def test_greedy_batch_matches_transformers(checkpoint_factory, monkeypatch, family, shape, options):
    path = checkpoint_factory(family, shape, **options)
    prompts = random_prompts(PROMPT_LENGTHS)
    engine = make_engine(path, max_model_len=max(PROMPT_LENGTHS) + NEW_TOKENS)
    completions, engine_logits = run_engine_recording_logits(engine, prompts, monkeypatch)

    model = load_transformers_model(path)
    for index, prompt in enumerate(prompts):
        expected_tokens, expected_logits = transformers_greedy(model, prompt)
        completion = completions[str(index)]
        assert len(expected_tokens) == NEW_TOKENS
        assert completion.token_ids == expected_tokens, f"prompt of {len(prompt)} tokens"
        assert completion.finish_reason == "length"
        # Row 0 is the prefill's last position, the others are decode steps.
        difference = (engine_logits[str(index)] - expected_logits).abs().max().item()
        assert difference < LOGITS_TOLERANCE, f"prompt of {len(prompt)} tokens: {difference}"


@pytest.mark.parametrize(
    ("family", "shape", "options"),
    [
        pytest.param("llama", "tiny", {}, id="llama-gqa"),
        pytest.param("qwen3", "tiny-mha", {}, id="qwen3-mha"),
        pytest.param("mistral", {"sliding_window": 16}, {}, id="mistral-sliding-window"),
    ],
)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_mixed_steps_and_chunked_prefill_match_transformers(
    checkpoint_factory, monkeypatch, family, shape, options, async_scheduling
):
    """Prompts arrive while others decode, under a 24-token step budget: steps mix decode rows
    with whole prompts and with chunks after a cached prefix, in one attention call; with
    asynchronous scheduling the decode rows take their input tokens on the device."""
    path = checkpoint_factory(family, shape, **options)
    prompts = random_prompts([40, 3, 17, 1, 64, 9], seed=3)
    engine = make_engine(
        path, max_model_len=128, max_num_batched_tokens=24, async_scheduling=async_scheduling
    )
    step_shapes = []
    real_forward = engine.runner._forward

    def recording_forward(inputs, *placeholders):
        step_shapes.append(list(inputs.query_lens))
        return real_forward(inputs, *placeholders)

    monkeypatch.setattr(engine.runner, "_forward", recording_forward)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    completions: dict[str, Completion] = {}
    for index, prompt in enumerate(prompts):  # one new prompt every other step
        engine.add_request(str(index), prompt, params)
        for _ in range(2):
            collect(completions, engine.step())
    while engine.has_unfinished_requests():
        collect(completions, engine.step())
    mixed = [shape for shape in step_shapes if 1 in shape and max(shape) > 1]
    assert any(len(shape) > 2 for shape in mixed), step_shapes  # decode rows beside a prompt
    assert any(sum(shape) == 24 for shape in step_shapes)  # a prompt cut into chunks

    model = load_transformers_model(path)
    for index, prompt in enumerate(prompts):
        input_ids = torch.tensor([prompt])
        expected = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12, do_sample=False
        )[0, len(prompt) :].tolist()
        assert completions[str(index)].token_ids == expected, f"prompt of {len(prompt)} tokens"

"""Sampling fields through a real server: log-probabilities equal transformers' log-softmax,
several choices, echo, min_tokens, logit_bias, and unknown fields refused."""

from __future__ import annotations

import functools

import openai
import pytest
import torch
from server_process import SHARED_MODEL
from streams import hang_up_after_first_event
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over"
# float32 on both sides; the engine's and transformers' logits differ by ~1e-5.
LOGPROB_TOLERANCE = 1e-4


@functools.cache
def reference(model_root) -> tuple:
    from transformers import AutoModelForCausalLM

    checkpoint = model_root / SHARED_MODEL
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def reference_logprobs(model, prompt_ids: list[int], generated_ids: list[int]) -> torch.Tensor:
    """[generated, vocab]: log-softmax of transformers' logits at each generated position."""
    ids = torch.tensor([prompt_ids + generated_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)


def test_completion_logprobs_equal_transformers(server, shared_model):
    model, tokenizer = reference(server.model_root)
    prompt_ids = tokenizer.encode(PROMPT).ids
    completion = server.openai().completions.create(
        model=shared_model,
        prompt=prompt_ids,
        max_tokens=6,
        temperature=0.9,
        seed=4,
        logprobs=3,
        # Token ids, not texts: many byte tokens decode alone to the same U+FFFD.
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    logprobs = completion.choices[0].logprobs
    generated = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    assert len(generated) == 6
    # Sampled at temperature 0.9, reported as the raw logits' log-softmax.
    expected = reference_logprobs(model, prompt_ids, generated)
    for step, token_id in enumerate(generated):
        assert logprobs.token_logprobs[step] == pytest.approx(
            expected[step, token_id].item(), abs=LOGPROB_TOLERANCE
        )
        top_values, top_ids = expected[step].topk(3)
        reported = logprobs.top_logprobs[step]
        # The sampled token and the 3 most likely ones (vLLM's shape).
        top_names = [f"token_id:{i}" for i in top_ids.tolist()]
        assert set(reported) == {logprobs.tokens[step], *top_names}
        for name, value in zip(top_names, top_values.tolist(), strict=True):
            assert reported[name] == pytest.approx(value, abs=LOGPROB_TOLERANCE)
    assert logprobs.text_offset[0] == 0


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, shared_model):
    """lm-eval-harness's loglikelihood request: echo, logprobs 1, one generated token."""
    model, tokenizer = reference(server.model_root)
    prompt_ids = tokenizer.encode(PROMPT).ids
    client = server.openai()
    options = dict(
        model=shared_model,
        prompt=PROMPT,
        echo=True,
        logprobs=1,
        max_tokens=1,
        temperature=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    choice = client.completions.create(**options).choices[0]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    token_ids = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    assert token_ids[: len(prompt_ids)] == prompt_ids and len(token_ids) == len(prompt_ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference_logprobs(model, prompt_ids[:1], token_ids[1:])
    for position, token_id in enumerate(token_ids[1:]):
        assert logprobs.token_logprobs[position + 1] == pytest.approx(
            expected[position, token_id].item(), abs=LOGPROB_TOLERANCE
        )
        best = f"token_id:{expected[position].argmax().item()}"
        assert max(logprobs.top_logprobs[position + 1].items(), key=lambda kv: kv[1])[0] == best
    streamed = [
        token
        for chunk in client.completions.create(stream=True, **options)
        for token in (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])
    ]
    assert streamed == logprobs.tokens
    # A one-token prompt: its token, with nothing to score it by, then the generated one.
    alone = client.completions.create(**{**options, "prompt": prompt_ids[:1]}).choices[0]
    assert alone.logprobs.tokens[0] == f"token_id:{prompt_ids[0]}"
    assert alone.logprobs.token_logprobs[0] is None and len(alone.logprobs.tokens) == 2


def test_streamed_logprobs_equal_the_whole_response(server, shared_model):
    client = server.openai()
    options = dict(model=shared_model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    whole = client.completions.create(**options).choices[0]
    assert "".join(whole.logprobs.tokens) == whole.text
    whole = whole.logprobs
    streamed_tokens, streamed_offsets = [], []
    for chunk in client.completions.create(stream=True, **options):
        if chunk.choices[0].logprobs is not None:
            streamed_tokens += chunk.choices[0].logprobs.tokens
            streamed_offsets += chunk.choices[0].logprobs.text_offset
    assert streamed_tokens == whole.tokens
    assert streamed_offsets == whole.text_offset


def test_chat_logprobs_shape_and_streaming(server, shared_model):
    client = server.openai()
    messages = [{"role": "user", "content": "Name a colour."}]
    options = dict(
        model=shared_model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**options)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    streamed = [
        entry
        for chunk in client.chat.completions.create(stream=True, **options)
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=shared_model, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_several_choices_and_prompts(server, shared_model):
    client = server.openai()
    options = dict(
        model=shared_model,
        max_tokens=8,
        temperature=1.0,
        seed=9,
        extra_body={"ignore_eos": True},
    )
    completion = client.completions.create(prompt=[PROMPT, "Hello"], n=3, **options)
    texts = [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]
    assert [choice.index for choice in completion.choices] == list(range(6))
    # Seeds 9, 10, 11 per prompt: the samples differ, and each equals the same seed alone.
    assert len(set(texts[:3])) == 3
    alone = client.completions.create(prompt="Hello", **{**options, "seed": 10}).choices[0].text
    assert texts[4] == alone
    assert (
        completion.usage.completion_tokens
        == sum(len(choice.text) > 0 and 0 for choice in completion.choices)
        + completion.usage.total_tokens
        - completion.usage.prompt_tokens
    )
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=PROMPT, n=3, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[index] for index in range(3)] == texts[:3]


def test_echo_min_tokens_and_max_completion_tokens(server, shared_model):
    _, tokenizer = reference(server.model_root)
    client = server.openai()
    echoed = client.completions.create(
        model=shared_model, prompt=PROMPT, echo=True, max_tokens=3, temperature=0
    )
    plain = client.completions.create(
        model=shared_model, prompt=PROMPT, max_tokens=3, temperature=0
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text

    eos = tokenizer.token_to_id("<|im_end|>")
    # EOS is made the certain choice; min_tokens holds it back for 3 tokens.
    held = client.completions.create(
        model=shared_model,
        prompt=PROMPT,
        max_tokens=10,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 3},
    )
    assert held.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens == 4

    limited = client.completions.create(
        model=shared_model,
        prompt=PROMPT,
        temperature=0,
        extra_body={"max_completion_tokens": 5, "ignore_eos": True},
    )
    assert limited.usage.completion_tokens == 5


def test_logit_bias_forces_a_token(server, shared_model):
    _, tokenizer = reference(server.model_root)
    forced = tokenizer.encode(PROMPT).ids[2]
    completion = server.openai().completions.create(
        model=shared_model,
        prompt=PROMPT,
        max_tokens=4,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert completion.choices[0].text == tokenizer.decode([forced] * 4)


def test_bad_fields_are_400_and_the_server_keeps_serving(server, shared_model):
    client = server.openai()
    with pytest.raises(openai.BadRequestError, match="max_token: unrecognized"):
        client.completions.create(model=shared_model, prompt=PROMPT, extra_body={"max_token": 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias: token id 1000000"):
        client.completions.create(model=shared_model, prompt=PROMPT, logit_bias={"1000000": 1})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=shared_model,
            messages=[{"role": "user", "content": "Hi"}],
            logprobs=True,
            top_logprobs=21,
        )
    assert client.completions.create(model=shared_model, prompt=PROMPT, max_tokens=2).choices


def test_client_hang_up_ends_every_choice(server, shared_model):
    max_tokens = 480  # about half a second of generation per choice for the tiny model on CPU
    generated = ("warmserve_generation_tokens_total", (("model", shared_model),))
    before = server.metric_samples().get(generated, 0)
    body = {
        "model": shared_model,
        "prompt": "Hi",
        "n": 3,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with server.http() as http:
        in_flight = hang_up_after_first_event(http, body, shared_model)
    assert in_flight == 0
    # Every choice stopped early: none ran to max_tokens.
    assert server.metric_samples()[generated] - before < max_tokens


def test_logprobs_and_penalties_with_structured_output(server, shared_model):
    """The grammar mask applies before log-probabilities (as in vLLM): the most likely tokens
    reported are ones the grammar allows (a JSON object opens with "{", after any blanks)."""
    choice = (
        server.openai()
        .chat.completions.create(
            model=shared_model,
            messages=[{"role": "user", "content": "Give me JSON."}],
            response_format={"type": "json_object"},
            max_tokens=8,
            temperature=0.7,
            seed=2,
            logprobs=True,
            top_logprobs=2,
            presence_penalty=1.0,
            extra_body={"repetition_penalty": 1.3},
        )
        .choices[0]
    )
    content = choice.logprobs.content
    assert content and all(entry.logprob > -9999 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob for entry in content)
    for top in content[0].top_logprobs:
        if top.logprob > -9999:
            assert top.token.lstrip().startswith("{") or not top.token.strip(), top.token

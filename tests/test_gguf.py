"""A GGUF file (the real SmolLM2-135M-Instruct, Q4_1) served as transformers loads it: the same
dequantized float32 weights and tokenizer, the same greedy text, real English."""

from __future__ import annotations

import json

import pytest
import torch
from server_process import TEST_CACHE_ENV, serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.controller.tokenizer import ModelTokenizer
from warmserve.loader.checkpoint import Checkpoint, read_model_config
from warmserve.loader.tensors import iter_checkpoint_tensors

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
MAX_TOKENS = 12
# Its 8k context would not fit a CPU test worker's KV-cache budget.
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """transformers' own GGUF loading of the file, in float32."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return tokenizer, model.eval()


def reference_greedy(reference, token_ids: list[int]) -> str:
    tokenizer, model = reference
    with torch.no_grad():
        output = model.generate(
            torch.tensor([token_ids]), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return tokenizer.decode(output[0, len(token_ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    registry = (
        f"models:\n  - name: smollm2\n    path: {smollm2_path.name}\n    preload: true\n"
        f"    max_model_len: {MAX_MODEL_LEN}\n"
    )
    directory = tmp_path_factory.mktemp("gguf-server")
    with serving(smollm2_path.parent, directory, registry=registry, env=TEST_CACHE_ENV) as running:
        yield running


def test_weights_config_and_tokenizer_equal_transformers(smollm2_path, reference, monkeypatch):
    monkeypatch.setenv("WARMSERVE_CACHE_DIR", TEST_CACHE_ENV["WARMSERVE_CACHE_DIR"])
    tokenizer, model = reference
    checkpoint = Checkpoint(smollm2_path)
    state = model.state_dict()
    for name, tensor in iter_checkpoint_tensors(checkpoint):
        assert torch.equal(tensor, state[name]), name
    # The one tensor the file leaves out is the output head, tied to the embedding.
    assert set(state) - set(checkpoint.tensors) == {"lm_head.weight"}
    _, config = read_model_config(smollm2_path)
    assert config["tie_word_embeddings"] and model.config.tie_word_embeddings
    for key in ("num_key_value_heads", "num_hidden_layers", "vocab_size"):
        assert config[key] == getattr(model.config, key), key
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]

    ours = ModelTokenizer(smollm2_path)
    text = "Café — 東京 🙂 <|im_start|>user\nit's 1234567  x<|im_end|>"
    assert ours.encode(text) == tokenizer(text)["input_ids"]
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    assert ours.chat_token_ids(QUESTION) == list(expected)


def test_greedy_chat_and_completion_equal_transformers(server, reference):
    client = server.openai()
    chat = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
    )
    reply = chat.choices[0].message.content
    question_ids = reference[0].apply_chat_template(QUESTION, add_generation_prompt=True)
    assert reply == reference_greedy(reference, list(question_ids["input_ids"]))
    assert "Paris" in reply

    completion = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    prompt_ids = reference[0](PROMPT)["input_ids"]
    assert completion.choices[0].text == reference_greedy(reference, prompt_ids)


def test_gguf_chat_template_and_reload_from_the_host_cache(server):
    with server.http() as http:
        tokens = http.post("/tokenize", json={"model": "smollm2", "messages": QUESTION}).json()
        text = http.post("/detokenize", json={"model": "smollm2", "tokens": tokens["tokens"]})
        # The template from the file's metadata adds SmolLM's system prompt.
        assert "You are a helpful AI assistant named SmolLM" in text.json()["prompt"]
        assert http.delete("/admin/models/smollm2").status_code == 200
        body = {"name": "again", "path": "SmolLM2-135M-Instruct.Q4_1.gguf"}
        reloaded = http.post("/admin/models", json={**body, "max_model_len": MAX_MODEL_LEN})
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["source"] == "host-cache"
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "again", "messages": QUESTION, "max_tokens": 8, "temperature": 0},
        )
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        assert http.delete("/admin/models/again").status_code == 200


def test_structured_output_on_the_gguf_model(server):
    """The grammar's vocabulary comes from a tokenizer.json written from the file's metadata."""
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    chat = server.openai().chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert chat.choices[0].finish_reason == "stop"
    assert "Paris" in json.loads(chat.choices[0].message.content)["capital"]

"""`warmserve serve --async-scheduling` through HTTP: 64 concurrent greedy streams to two models on
one worker, some of them asking for log-probabilities (their steps wait for the step before),
answer what transformers generates for each prompt alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import random_prompts
from server_process import DEFAULT_REGISTRY, serving
from streams import stream_completion
from support import hf_greedy

from warmserve.controller.detokenizer import IncrementalDetokenizer
from warmserve.controller.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow

CLIENTS = 64


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    with serving(
        model_root,
        tmp_path_factory.mktemp("async-scheduling"),
        registry=DEFAULT_REGISTRY,
        extra_args=("--async-scheduling", "--workers", "1"),
    ) as running:
        yield running


def test_concurrent_greedy_streams_on_two_models_equal_transformers(server):
    """Two models on the one worker, both stepping with steps in flight on the same device."""
    models = {"m-llama": "tiny-llama", "m-qwen3": "tiny-qwen3"}
    with server.http() as http:
        for name, path in models.items():
            response = http.post("/admin/models", json={"name": name, "path": path})
            assert response.status_code == 200, response.text
    prompts = random_prompts([2 + 3 * index for index in range(CLIENTS)], seed=41)
    max_tokens = [4 + index % 13 for index in range(CLIENTS)]
    model_of = [list(models)[index % 2] for index in range(CLIENTS)]

    def ask(index: int):
        body = {
            "model": model_of[index],
            "prompt": prompts[index],
            "max_tokens": max_tokens[index],
            "temperature": 0,
            "ignore_eos": True,
        }
        if index % 8 == 3:
            body["logprobs"] = 2
        with server.http() as http:
            if index % 4 < 2:
                return stream_completion(http, body).text
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        texts = list(pool.map(ask, range(CLIENTS)))

    for index, text in enumerate(texts):
        checkpoint = server.model_root / models[model_of[index]]
        expected = hf_greedy(checkpoint, prompts[index], max_tokens[index])
        assert text == server_text(checkpoint, prompts[index], expected), index


def server_text(checkpoint, prompt_ids: list[int], token_ids: list[int]) -> str:
    """The text a completion of `token_ids` has: the output's first bytes decode together with
    the prompt's last (a random prompt may end inside a character), as in vLLM."""
    detokenizer = IncrementalDetokenizer(ModelTokenizer(checkpoint), prompt_ids)
    return detokenizer.add(token_ids, finished=True)

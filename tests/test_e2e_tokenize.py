"""GET /v1/models/{id} (the openai SDK's models.retrieve), and vLLM's /tokenize and /detokenize,
on a real server."""

from __future__ import annotations

import openai
import pytest
from server_process import REGISTERED_MODEL, SHARED_MODEL

from warmserve.controller.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Où est le café?"}]


def test_models_retrieve_with_the_openai_sdk(server, shared_model):
    client = server.openai()
    card = client.models.retrieve(shared_model)
    assert (card.id, card.object, card.owned_by) == (shared_model, "model", "warmserve")
    assert card.model_extra["state"] == "loaded"
    assert client.models.retrieve(REGISTERED_MODEL).id == REGISTERED_MODEL
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("no-such-model")
    assert raised.value.body["code"] == "model_not_found"


def test_tokenize_a_prompt_and_detokenize_it(server, shared_model):
    tokenizer = ModelTokenizer(server.model_root / SHARED_MODEL)
    with server.http() as http:
        response = http.post(
            "/tokenize",
            json={"model": shared_model, "prompt": "Hello there", "return_token_strs": True},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tokens"] == tokenizer.encode("Hello there")
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
        assert "".join(body["token_strs"]) == "HelloĠthere"  # byte-level BPE token strings
        back = http.post("/detokenize", json={"model": shared_model, "tokens": body["tokens"]})
        assert back.json() == {"prompt": "Hello there"}


def test_tokenize_a_chat_as_the_chat_route_does(server, shared_model):
    tokenizer = ModelTokenizer(server.model_root / SHARED_MODEL)
    with server.http() as http:
        body = http.post("/tokenize", json={"model": shared_model, "messages": MESSAGES}).json()
    assert body["tokens"] == tokenizer.chat_token_ids(MESSAGES)
    assert "token_strs" not in body


@pytest.mark.parametrize(
    ("route", "fields", "named"),
    [
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"prompt": "x", "promtp": "y"}, "promtp"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ],
)
def test_bad_tokenize_requests_are_400_naming_the_field(server, shared_model, route, fields, named):
    with server.http() as http:
        response = http.post(route, json={"model": shared_model, **fields})
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]


def test_unknown_model_is_404(server):
    with server.http() as http:
        response = http.post("/detokenize", json={"model": "no-such-model", "tokens": [1]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"

"""Every error the API documents, from a real server: status, JSON body, and still healthy."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == code
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 2.5},
        {"top_p": 0},
        {"max_tokens": 10**12},
        {"max_tokens": 0},
        {"n": 0},
        {"best_of": 2},
        {"max_token": 5},
        {"prompt": [[1, 2], []]},
        {"stop": 5},
    ],
)
def test_invalid_fields_are_400(server, shared_model, body):
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"model": shared_model, "prompt": "Hi", **body}
        )
    error = assert_error(response, 400, "invalid_request")
    assert error["type"] == "invalid_request_error"


def test_nan_and_malformed_json_are_400(server, shared_model):
    with server.http() as http:
        nan = json.dumps({"model": shared_model, "prompt": "Hi", "temperature": float("nan")})
        response = http.post(
            "/v1/completions", content=nan, headers={"content-type": "application/json"}
        )
        assert_error(response, 400, "invalid_request")
        response = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert "JSON" in assert_error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": -1},
        {"top_p": -0.5},
        {"top_k": -5},
        {"max_tokens": -1},
        {"top_k": 2**70},
        {"stop_token_ids": [2**70]},
        {"stop_token_ids": [-1]},
        {"seed": 2**64},
        {"prompt": [2**70]},
        {"keep_alive": "eventually"},
    ],
)
def test_negative_absurd_and_unencodable_values_are_400(server, shared_model, body):
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"model": shared_model, "prompt": "Hi", **body}
        )
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "fields",
    [
        '"prompt": "\\ud800"',
        '"prompt": "Hi", "stop": ["\\udfff"]',
        '"messages": [{"role": "user", "content": "\\ud800"}]',
    ],
)
def test_lone_surrogates_are_400(server, shared_model, fields):
    """Valid JSON escapes that are not Unicode text: no tokenizer can take them."""
    route = "/v1/chat/completions" if "messages" in fields else "/v1/completions"
    with server.http() as http:
        response = http.post(
            route,
            content=f'{{"model": "{shared_model}", {fields}}}',
            headers={"content-type": "application/json"},
        )
    assert "surrogate" in assert_error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "keep_alive", "max_tokens", "top_k"])
def test_nan_and_infinity_are_400(server, shared_model, field):
    with server.http() as http:
        for literal in ("NaN", "Infinity", "-Infinity"):
            content = f'{{"model": "{shared_model}", "prompt": "Hi", "{field}": {literal}}}'
            response = http.post(
                "/v1/completions", content=content, headers={"content-type": "application/json"}
            )
            assert_error(response, 400, "invalid_request")


def test_token_ids_outside_the_vocabulary_are_400(server, shared_model):
    vocab_size = json.loads((server.model_root / shared_model / "config.json").read_text())[
        "vocab_size"
    ]
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"model": shared_model, "prompt": [1, vocab_size]}
        )
        error = assert_error(response, 400, "invalid_request")
        assert str(vocab_size) in error["message"]
        response = http.post(
            "/v1/completions", json={"model": shared_model, "prompt": [vocab_size - 1]}
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "tiny-llama", "prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"model": "tiny-llama", "prompt": "\xff\xfe"}',
        b"\xff\xfe\x00\x00",
        b"[" * 100_000,  # deeper than any JSON parser recurses
        b'{"model": "tiny-llama", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",
        b"[]",
        b"null",
        b"",
    ],
)
def test_bodies_that_are_not_a_json_object_in_utf8_are_400(server, shared_model, content):
    with server.http() as http:
        for route in ("/v1/completions", "/v1/chat/completions", "/admin/models"):
            response = http.post(
                route, content=content, headers={"content-type": "application/json"}
            )
            assert_error(response, 400, "invalid_request")


def test_unusable_admin_paths_are_400(server):
    with server.http() as http:
        for route in ("/admin/models", "/admin/registry"):
            response = http.post(route, json={"name": "x", "path": "a\u0000b"})
            assert_error(response, 400, "invalid_request")
            response = http.post(route, json={"name": "x", "path": "a" * 5000})
            assert (
                "File name too long" in assert_error(response, 400, "invalid_checkpoint")["message"]
            )
            response = http.post(route, json={"name": "x", "path": "tiny-llama", "keep_alive": [1]})
            assert_error(response, 400, "invalid_request")


def test_prompt_beyond_the_context_is_400(server, shared_model):
    with server.http() as http:
        response = http.post(
            "/v1/completions", json={"model": shared_model, "prompt": [1] * 5000, "max_tokens": 1}
        )
    assert response.status_code == 400, response.text


def test_auth_errors_are_401(server):
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, "invalid_api_key")
    wrong = {"Authorization": "Bearer not-the-key"}
    assert_error(httpx.get(f"{server.url}/admin/workers", headers=wrong), 401, "invalid_api_key")


def test_unknown_model_and_route_are_404(server):
    with pytest.raises(openai.NotFoundError) as raised:
        server.openai().completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"
    with server.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404, "not_found")
        assert_error(http.get("/v1/completions"), 405, "method_not_allowed")


def test_admin_refusals(server, shared_model):
    with server.http() as http:
        outside = http.post("/admin/models", json={"name": "x", "path": "/etc"})
        assert_error(outside, 403, "path_outside_model_root")
        escaping = http.post("/admin/models", json={"name": "x", "path": "../../etc"})
        assert_error(escaping, 403, "path_outside_model_root")
        exists = http.post("/admin/models", json={"name": shared_model, "path": "tiny-llama"})
        assert_error(exists, 409, "model_exists")
        missing = http.post("/admin/models", json={"name": "x", "path": "no-such-checkpoint"})
        assert missing.status_code in (400, 404), missing.text
        bad_tp = http.post(
            "/admin/models", json={"name": "x", "path": "tiny-qwen3", "tensor_parallel_size": 0}
        )
        assert_error(bad_tp, 400, "invalid_request")
        # Bounds come from one place (ModelSpec), whichever way a load arrives.
        for length in (1, 2**31, 774832586255910607781888):
            too_long = http.post(
                "/admin/models", json={"name": "x", "path": "tiny-qwen3", "max_model_len": length}
            )
            message = assert_error(too_long, 400, "invalid_request")["message"]
            assert "max_model_len must be an integer from 2 to" in message


def test_oversized_body_is_413(server, shared_model):
    with server.http() as http:
        response = http.post(
            "/v1/completions",
            json={"model": shared_model, "prompt": "x" * (5 * 1024 * 1024)},
        )
    assert_error(response, 413, "request_too_large")


def test_server_is_healthy_after_the_errors(server, shared_model):
    assert httpx.get(f"{server.url}/health").status_code == 200
    completion = server.openai().completions.create(model=shared_model, prompt="Hi", max_tokens=2)
    assert completion.usage.completion_tokens >= 1

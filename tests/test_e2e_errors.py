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
        {"n": 2},
        {"prompt": [[1, 2], [3, 4]]},
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


def test_no_capacity_is_503_with_retry_after(server, shared_model):
    with server.http() as http:
        response = http.post(
            "/admin/models",
            json={"name": "too-wide", "path": "tiny-qwen3", "tensor_parallel_size": 2},
        )
    assert_error(response, 503, "no_capacity")
    assert int(response.headers["retry-after"]) >= 1


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

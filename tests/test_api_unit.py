"""The HTTP layer over an in-memory controller: validation, error bodies, SSE framing, auth,
metrics. Fast; the same behaviour against real workers is in the test_e2e_* modules."""

from __future__ import annotations

import json
import logging
import math

import pytest
from fake_controller import KV_MAPPED_BYTES, KV_POOL_FREE_BYTES, KV_USED_BYTES, MODEL
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from warmserve.api import create_app
from warmserve.api.limits import MAX_BODY_BYTES
from warmserve.api.openai_responses import CompletionChoice
from warmserve.api.openai_schemas import CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS
from warmserve.api.sse import sse_event
from warmserve.config import ServerConfig

API_KEY = "secret"


def sse_payloads(text: str) -> list:
    """Parses a body as the openai client does; asserts the framing on the way."""
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        payloads.append(json.loads(event.removeprefix("data: ")))
    return payloads


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    assert "Traceback" not in error["message"]
    return error


def test_completion_fills_usage_and_uses_openai_default_max_tokens(client, controller):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c"})
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": COMPLETION_DEFAULT_MAX_TOKENS,
        "total_tokens": 3 + COMPLETION_DEFAULT_MAX_TOKENS,
    }
    assert controller.last_params.max_tokens == COMPLETION_DEFAULT_MAX_TOKENS


def test_sampling_fields_reach_the_controller(client, controller):
    client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": [[1, 2, 3]],
            "max_tokens": 3,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 4,
            "seed": 7,
            "stop": "x",
            "ignore_eos": True,
        },
    ).raise_for_status()
    params = controller.last_params
    assert controller.last_prompt == [1, 2, 3]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (3, 0, 0.5, 4)
    assert (params.seed, params.stop, params.ignore_eos) == (7, ("x",), True)


def test_chat_renders_text_parts_and_takes_max_completion_tokens(client, controller):
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "you"}],
        },
    ]
    body = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_completion_tokens": 2},
    ).json()
    assert controller.last_chat[0] == "system: be brief\nuser: hi\nyou\nassistant:"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " w0 w1"}
    assert body["usage"]["completion_tokens"] == 2


def test_chat_template_options_reach_the_template(client, controller):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am"}]
    client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": messages,
            "chat_template_kwargs": {"enable_thinking": False},
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ).raise_for_status()
    text, options = controller.last_chat
    assert text == "user: hi\nassistant: I am"
    assert options == {
        "continue_final_message": True,
        "template_kwargs": {"enable_thinking": False},
    }


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"chat_template_kwargs": "yes"}, "chat_template_kwargs"),
    ],
)
def test_bad_chat_template_options_are_400_naming_the_field(client, fields, named):
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields},
    )
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_generation_config_fills_what_the_request_leaves_out(client, controller, route):
    controller.generation_defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    body = {"model": MODEL, "top_p": 0.5}
    body |= (
        {"prompt": "x"}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "x"}]}
    )
    client.post(route, json=body).raise_for_status()
    params = controller.last_params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.5, 20)


def test_chat_default_max_tokens(client, controller):
    client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
    ).raise_for_status()
    assert controller.last_params.max_tokens == CHAT_DEFAULT_MAX_TOKENS


def test_chat_stream_framing_role_first_finish_last_then_usage(client):
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:-2]]
    assert "".join(contents) == " w0 w1 w2"
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completion_stream_carries_finish_reason_on_last_text_chunk(client):
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2, "stream": True}
    )
    chunks = sse_payloads(response.text)
    assert [chunk["choices"][0]["text"] for chunk in chunks] == [" w0", " w1"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, "length"]


def test_failure_mid_stream_becomes_an_error_event_then_done(client, controller):
    controller.failing_models.add(MODEL)
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 5, "stream": True}
    )
    assert response.status_code == 200
    chunks = sse_payloads(response.text)
    assert chunks[-1]["error"]["code"] == "model_unavailable"
    assert chunks[-1]["error"]["type"] == "service_unavailable_error"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("temperature", 2.5, "temperature"),
        ("temperature", -0.1, "temperature"),
        ("temperature", math.nan, "temperature"),
        ("temperature", math.inf, "temperature"),
        ("top_p", 0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 10**12, "max_tokens"),
        ("max_tokens", "many", "max_tokens"),
        ("top_k", -2, "top_k"),
        ("n", 0, "n"),
        ("n", 129, "n"),
        ("best_of", 3, "best_of"),
        ("suffix", "x", "suffix is not supported"),
        ("max_token", 5, "max_token: unrecognized"),
        ("max_completion_tokens", 7, "max_completion_tokens"),
        ("logprobs", 21, "logprobs"),
        ("logprobs", -1, "logprobs"),
        ("echo", "sometimes", "echo"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -3, "frequency_penalty"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("min_p", 1.5, "min_p"),
        ("min_tokens", -1, "min_tokens"),
        ("min_tokens", 17, "min_tokens"),
        ("logit_bias", {"5": 101}, "logit_bias"),
        ("logit_bias", {"five": 1}, "logit_bias"),
        ("logit_bias", {"-5": 1}, "logit_bias"),
        ("logit_bias", [5], "logit_bias"),
        ("seed", 2**70, "seed"),
        ("prompt", [[1], []], "prompt"),
        ("prompt", ["a", 5], "prompt"),
        ("prompt", [], "non-empty"),
        ("prompt", [1, -1], "non-negative"),
        ("prompt", {"text": "a"}, "prompt"),
        ("stop", ["s"] * 17, "stop"),
        ("stream_options", {"include_usage": True}, "stream: true"),
    ],
)
def test_invalid_completion_fields_are_400_naming_the_field(client, field, value, fragment):
    # max_tokens 16: min_tokens 17 exceeds it, and a different max_completion_tokens conflicts.
    body = {"model": MODEL, "prompt": "a", "max_tokens": 16, field: value}
    # allow_nan: the json module writes NaN/Infinity literals, as some clients do.
    response = client.post(
        "/v1/completions",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_chat_refuses_images_and_empty_messages(client):
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": [image]}]},
    )
    assert "image_url" in assert_error(response, 400, "invalid_request")["message"]
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert "messages" in assert_error(response, 400, "invalid_request")["message"]


def test_malformed_json_missing_model_and_controller_refusals(client):
    response = client.post(
        "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_error(response, 400, "invalid_request")["message"]
    response = client.post("/v1/completions", json={"prompt": "a"})
    assert "model" in assert_error(response, 400, "invalid_request")["message"]
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 100]})
    assert_error(response, 400, "invalid_request")
    response = client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert_error(response, 404, "model_not_found")


def test_http_level_errors(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/completions"), 405, "method_not_allowed")
    too_big = b"x" * (MAX_BODY_BYTES + 1)
    response = client.post(
        "/v1/completions", content=too_big, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "request_too_large")


def test_admin_errors_and_retry_after(client):
    response = client.post("/admin/models", json={"name": MODEL, "path": "m"})
    assert_error(response, 409, "model_exists")
    response = client.post("/admin/models", json={"name": "x", "path": "/etc"})
    assert_error(response, 403, "path_outside_model_root")
    response = client.post("/admin/models", json={"name": "x", "path": "m", "tensor_paralel": 2})
    assert "tensor_paralel" in assert_error(response, 400, "invalid_request")["message"]
    response = client.post(
        "/admin/models", json={"name": "x", "path": "m", "tensor_parallel_size": 2}
    )
    assert_error(response, 503, "no_capacity")
    assert response.headers["retry-after"] == "5"
    assert_error(client.delete("/admin/models/nope"), 404, "model_not_found")


def test_unexpected_exception_is_a_generic_500(client, controller):
    def broken_models():
        raise RuntimeError("secret internals")

    controller.models = broken_models
    error = assert_error(client.get("/v1/models"), 500, "internal_error")
    assert "secret" not in error["message"]


def test_api_key_guards_everything_but_health(controller):
    app = create_app(controller, ServerConfig(device="cpu", api_key=API_KEY))
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok", "workers": 2}
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(client.get("/metrics", headers=wrong), 401, "invalid_api_key")
        right = {"Authorization": f"Bearer {API_KEY}"}
        assert client.get("/v1/models", headers=right).status_code == 200


def test_models_and_admin_listings(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert {card["id"], card["object"], card["owned_by"], card["state"]} == {
        MODEL,
        "model",
        "warmserve",
        "loaded",
    }
    assert client.get("/admin/models").json()[0]["name"] == MODEL
    workers = client.get("/admin/workers").json()
    assert {"id", "pid", "node", "device", "state", "models", "memory_free_bytes"} <= set(
        workers[0]
    )
    assert workers[0]["models"] == [
        {
            "name": MODEL,
            "memory_bytes": 1 << 30,
            "state": "loaded",
            "kv_mapped_bytes": KV_MAPPED_BYTES,
            "kv_used_bytes": KV_USED_BYTES,
        }
    ]
    assert workers[0]["kv_pool_free_bytes"] == KV_POOL_FREE_BYTES


def test_metrics_count_requests_tokens_swaps_and_pool(client, controller):
    client.post("/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 4})
    client.post("/admin/models", json={"name": "other", "path": "o"}).raise_for_status()
    client.delete("/admin/models/other").raise_for_status()
    client.post("/v1/completions", json={"model": "ghost", "prompt": "a"})
    text = client.get("/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert all(name.startswith("warmserve_") for name, _ in samples)
    ok = (("model", MODEL), ("route", "/v1/completions"), ("status", "200"))
    assert samples[("warmserve_requests_total", ok)] == 1
    unknown = (("model", ""), ("route", "/v1/completions"), ("status", "404"))
    assert samples[("warmserve_requests_total", unknown)] == 1
    assert samples[("warmserve_prompt_tokens_total", (("model", MODEL),))] == 2
    assert samples[("warmserve_generation_tokens_total", (("model", MODEL),))] == 4
    assert samples[("warmserve_time_to_first_token_seconds_count", (("model", MODEL),))] == 1
    assert samples[("warmserve_model_load_seconds_count", (("source", "disk"),))] == 1
    assert samples[("warmserve_model_load_seconds_count", (("source", "host-cache"),))] == 1
    assert samples[("warmserve_model_unload_seconds_count", ())] == 1
    assert samples[("warmserve_worker_state", (("state", "ready"), ("worker", "0")))] == 1
    assert samples[("warmserve_worker_state", (("state", "dead"), ("worker", "0")))] == 0
    resident = (("model", MODEL), ("worker", "0"))
    assert samples[("warmserve_model_resident_bytes", resident)] == 1 << 30
    assert samples[("warmserve_model_kv_mapped_bytes", resident)] == KV_MAPPED_BYTES
    assert samples[("warmserve_model_kv_used_bytes", resident)] == KV_USED_BYTES
    assert (
        samples[("warmserve_worker_kv_pool_free_bytes", (("worker", "0"),))] == KV_POOL_FREE_BYTES
    )
    assert samples[("warmserve_model_requests_queued", (("model", MODEL),))] == 0
    assert ("warmserve_host_cache_bytes", ()) in samples


def test_only_model_app_serves_one_model(controller):
    app = create_app(controller, ServerConfig(device="cpu"), only_model=MODEL)
    with TestClient(app) as client:
        assert_error(client.get("/admin/workers"), 404, "not_found")
        assert_error(client.post("/v1/completions", json={"prompt": "a"}), 404, "model_not_found")
        controller._models[MODEL] = controller._models.get(MODEL) or _model_info()
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 200
        response = client.post("/v1/completions", json={"model": "other", "prompt": "a"})
        assert "serves only" in assert_error(response, 404, "model_not_found")["message"]
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == [MODEL]


def _model_info():
    from warmserve.controller.types import ModelInfo

    return ModelInfo(MODEL, "m", "loaded", [0])


@pytest.mark.parametrize(
    ("keep_alive", "seconds"), [("5m", 300.0), ("30s", 30.0), (0, 0.0), (-1, -1.0), (12.5, 12.5)]
)
def test_keep_alive_reaches_the_controller_in_seconds(client, controller, keep_alive, seconds):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1, "keep_alive": keep_alive}
    client.post("/v1/completions", json=body).raise_for_status()
    assert controller.last_keep_alive == seconds
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    client.post("/v1/chat/completions", json={**chat, "keep_alive": keep_alive}).raise_for_status()
    assert controller.last_keep_alive == seconds


def test_no_keep_alive_leaves_the_model_s_own(client, controller):
    client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert controller.last_keep_alive is None


@pytest.mark.parametrize("keep_alive", ["soon", "5 minutes", True, math.nan, [1], {"s": 1}])
def test_invalid_keep_alive_is_400(client, keep_alive):
    body = {"model": MODEL, "prompt": "a", "keep_alive": keep_alive}
    response = client.post(
        "/v1/completions",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert "keep_alive" in assert_error(response, 400, "invalid_request")["message"]


def test_admin_load_takes_keep_alive(client):
    response = client.post("/admin/models", json={"name": "k", "path": "k", "keep_alive": "1h"})
    response.raise_for_status()
    listed = {model["name"]: model for model in client.get("/admin/models").json()}
    assert listed["k"]["keep_alive"] == 3600.0
    response = client.post("/admin/models", json={"name": "j", "path": "j", "keep_alive": "x"})
    assert_error(response, 400, "invalid_request")


def test_registry_routes(client, controller):
    entry = {"name": "r", "path": "r", "keep_alive": "2m", "pinned": True}
    registered = client.post("/admin/registry", json=entry)
    assert registered.status_code == 200, registered.text
    assert registered.json()["state"] == "disk"
    spec = controller.registry["r"]
    assert (spec.keep_alive, spec.pinned, spec.preload) == (120.0, True, False)
    card = next(card for card in client.get("/v1/models").json()["data"] if card["id"] == "r")
    assert (card["state"], card["keep_alive"], card["pinned"]) == ("disk", 120.0, True)
    assert_error(client.post("/admin/registry", json=entry), 409, "model_exists")
    outside = client.post("/admin/registry", json={"name": "o", "path": "/etc"})
    assert_error(outside, 403, "path_outside_model_root")
    for bad in (
        {"name": "b", "path": "b", "colour": "red"},
        {"name": "b"},
        {**entry, "name": " r"},
    ):
        assert_error(client.post("/admin/registry", json=bad), 400, "invalid_request")
    assert client.delete("/admin/registry/r").json() == {"name": "r"}
    assert "r" not in controller.registry
    assert_error(client.delete("/admin/registry/r"), 404, "model_not_found")


def test_policy_counters_are_prometheus_counters(client, controller):
    controller.counters.update(auto_loads=3, evictions=2, idle_unloads=1)
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    assert samples["warmserve_auto_loads_total"] == 3
    assert samples["warmserve_evictions_total"] == 2
    assert samples["warmserve_idle_unloads_total"] == 1


def test_sse_events_survive_clients_that_split_lines_like_splitlines():
    text = "a\u2028b\u2029c\x85d\re\nf"
    event = sse_event(CompletionChoice(text=text))
    lines = event.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["text"] == text


def test_every_step_with_tokens_makes_a_chunk_even_when_its_text_is_held_back(client, controller):
    # Two tokens whose text is not out yet (half a character, say), then one that completes it.
    controller.reply_pieces = ["", "", "é"]
    for route, body in (
        ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stream": True},
        ),
    ):
        payloads = sse_payloads(client.post(route, json=body).text)
        token_chunks = [p for p in payloads if p["choices"] and p["choices"][0].get("delta") != {}]
        if route == "/v1/chat/completions":
            token_chunks = token_chunks[1:]  # the role chunk comes first
        assert len(token_chunks) == 3, (route, payloads)


def test_refused_requests_are_logged_with_their_reason(client, controller, caplog):
    caplog.set_level(logging.INFO, logger="warmserve")
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 9})
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    lines = [record.getMessage() for record in caplog.records]
    assert any(
        line.startswith("refused POST /v1/completions: 400 invalid_request: temperature")
        for line in lines
    )
    assert any(
        line.startswith("refused POST /v1/completions: 404 model_not_found") for line in lines
    )

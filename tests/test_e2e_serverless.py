"""Serverless policies over HTTP: a real server with three registered models and room for two
(one on each worker)."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_process import REPO_ROOT, serving, subprocess_env, unload_everything
from support import ONE_MODEL_PER_WORKER_GB, PROMPTS, hf_greedy
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

# Registered name -> checkpoint under the model root.
MODELS = {"m-llama": "tiny-llama", "m-qwen3": "tiny-qwen3", "m-opt": "tiny-opt"}
REGISTRY = "models:\n" + "".join(
    f"  - name: {name}\n    path: {path}\n" for name, path in MODELS.items()
)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    with serving(
        model_root,
        tmp_path_factory.mktemp("serverless"),
        registry=REGISTRY,
        extra_args=("--worker-memory-gb", str(ONE_MODEL_PER_WORKER_GB), "--min-residency", "0"),
    ) as running:
        yield running


@pytest.fixture
def http(server):
    with server.http() as client:
        unload_everything(client)
        yield client


def counter(server, name: str) -> float:
    return server.metric_samples().get((f"warmserve_{name}_total", ()), 0.0)


def states(http) -> dict[str, str]:
    return {model["name"]: model["state"] for model in http.get("/admin/models").json()}


def greedy(http, model: str, prompt_ids: list[int], **extra) -> dict:
    response = http.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            **extra,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_state(http, model: str, state: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while states(http)[model] != state:
        assert time.monotonic() < deadline, f"{model} stayed {states(http)[model]}"
        time.sleep(0.05)


def test_cycling_three_models_on_two_workers_matches_transformers(server, http):
    pids = server.worker_pids()
    evictions, auto_loads = counter(server, "evictions"), counter(server, "auto_loads")
    names = list(MODELS)
    schedule = [(names[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(9)]
    for name, prompt in schedule:
        checkpoint = server.model_root / MODELS[name]
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        prompt_ids = tokenizer.encode(prompt).ids
        reference = tokenizer.decode(hf_greedy(checkpoint, prompt_ids, MAX_TOKENS))
        completion = greedy(http, name, prompt_ids)
        assert completion["choices"][0]["text"] == reference, (name, prompt)
        assert completion["usage"]["completion_tokens"] == MAX_TOKENS
    # Each request after the first two finds its model evicted.
    assert counter(server, "evictions") - evictions == 7
    assert counter(server, "auto_loads") - auto_loads == 9
    assert server.worker_pids() == pids
    assert sorted(states(http).values()) == ["host-cache", "loaded", "loaded"]


def test_keep_alive_zero_in_the_request_unloads_after_it(server, http):
    idle_unloads = counter(server, "idle_unloads")
    greedy(http, "m-opt", [1, 2, 3], keep_alive=0)
    greedy(http, "m-llama", [1, 2, 3], keep_alive="5m")
    wait_for_state(http, "m-opt", "host-cache")
    assert counter(server, "idle_unloads") - idle_unloads == 1
    listed = {model["name"]: model for model in http.get("/admin/models").json()}
    assert listed["m-llama"]["state"] == "loaded" and listed["m-llama"]["keep_alive"] == 300.0


def test_pinned_model_is_never_evicted(server, http):
    registered = http.post(
        "/admin/registry", json={"name": "pinned", "path": "tiny-qwen3", "pinned": True}
    )
    assert registered.status_code == 200, registered.text
    try:
        evictions = counter(server, "evictions")
        for name in ["pinned", "m-llama", "m-opt", "m-llama", "m-opt"]:
            greedy(http, name, [5, 6, 7])
            assert states(http)["pinned"] == "loaded"
        # The pinned model keeps its worker; the other two take turns on the second one.
        assert counter(server, "evictions") - evictions == 3
    finally:
        http.delete("/admin/registry/pinned")


def test_simultaneous_first_requests_share_one_load(server, http):
    auto_loads = counter(server, "auto_loads")
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda ids: greedy(http, "m-qwen3", ids), [[1, 2], [3, 4]] * 2))
    assert counter(server, "auto_loads") - auto_loads == 1
    assert all(output["usage"]["completion_tokens"] == MAX_TOKENS for output in outputs)


def test_no_room_held_by_explicit_loads_is_503_with_retry_after(server, http):
    for name, path in (("x-llama", "tiny-llama"), ("x-qwen3", "tiny-qwen3")):
        loaded = http.post("/admin/models", json={"name": name, "path": path})
        assert loaded.status_code == 200, loaded.text
    refused = http.post("/admin/models", json={"name": "x-opt", "path": "tiny-opt"})
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "no_capacity" and "x-llama" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1


def test_runtime_registration_and_unregistration(server, http):
    entry = {"name": "late", "path": "tiny-opt", "keep_alive": "2m"}
    registered = http.post("/admin/registry", json=entry)
    assert registered.status_code == 200, registered.text
    assert registered.json()["state"] in ("disk", "host-cache")
    try:
        assert http.post("/admin/registry", json=entry).status_code == 409
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards["late"]["keep_alive"] == 120.0
        assert cards["late"]["state"] in ("disk", "host-cache")
        greedy(http, "late", [1, 2, 3])
        assert states(http)["late"] == "loaded"
    finally:
        assert http.delete("/admin/registry/late").status_code == 200
    assert "late" not in states(http)
    gone = http.post("/v1/completions", json={"model": "late", "prompt": "a"})
    assert gone.status_code == 404
    refusals = [
        ({"name": "x", "path": "/etc"}, 403),
        ({"name": "x", "path": "no-such-checkpoint"}, 400),
        ({"name": "x", "path": "tiny-opt", "keep_alive": "soon"}, 400),
        ({"name": "m-llama", "path": "tiny-opt"}, 409),
    ]
    for body, status in refusals:
        response = http.post("/admin/registry", json=body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "code"}


def test_ps_shows_state_last_use_keep_alive_and_pinning(server, http):
    greedy(http, "m-llama", [1, 2])
    listing = subprocess.run(
        [sys.executable, "-m", "warmserve", "ps", "--url", server.url],
        capture_output=True,
        text=True,
        env=subprocess_env(WARMSERVE_API_KEY=server.api_key),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.split("\n\n")[0].splitlines()
    columns = ["MODEL", "STATE", "WORKERS", "TP", "DTYPE", "SOURCE", "LOAD S", "LAST USED"]
    assert all(column in header for column in [*columns, "KEEP ALIVE", "PINNED"])
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["m-llama"][1] == "loaded" and "ago" in by_name["m-llama"]
    assert by_name["m-llama"][-3:-1] == ["5m", "no"]
    assert by_name["m-opt"][1] in ("disk", "host-cache")

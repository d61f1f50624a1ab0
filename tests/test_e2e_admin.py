"""Admin routes, per-model ports, metrics and the CLI client commands against a real server."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from server_process import REPO_ROOT, free_port, subprocess_env

pytestmark = pytest.mark.slow

OTHER_CHECKPOINT = "tiny-qwen3"


def test_health_and_workers(server, shared_model):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "workers": 2}
    with server.http() as http:
        workers = http.get("/admin/workers").json()
    assert sorted(worker["id"] for worker in workers) == [0, 1]
    serving = [w for w in workers if shared_model in [m["name"] for m in w["models"]]]
    assert len(serving) == 1 and serving[0]["state"] == "ready"
    assert all(worker["device"].startswith("cpu") and worker["pid"] for worker in workers)
    resident = serving[0]["models"][0]
    assert resident["memory_bytes"] > 0 and resident["state"] == "loaded"
    assert serving[0]["memory_free_bytes"] <= (
        serving[0]["memory_usable_bytes"] - resident["memory_bytes"]
    )


def test_model_port_serves_its_model_until_unloaded(server, shared_model):
    port = free_port()
    with server.http() as http:
        response = http.post(
            "/admin/models", json={"name": "ported", "path": OTHER_CHECKPOINT, "port": port}
        )
        assert response.status_code == 200, response.text
        loaded = response.json()
        assert loaded["name"] == "ported" and loaded["source"] in ("disk", "host-cache")
        assert loaded["load_seconds"] > 0 and len(loaded["workers"]) == 1
        try:
            own_port = server.openai(port)
            completion = own_port.completions.create(model="ported", prompt="Hi", max_tokens=3)
            assert completion.model == "ported"
            assert [model.id for model in own_port.models.list().data] == ["ported"]
            listed = {model["name"]: model for model in http.get("/admin/models").json()}
            assert listed["ported"]["port"] == port
            # A CPU model has no kernels to warm nor graphs to capture: warm from its load on.
            assert listed["ported"]["warm_seconds"] >= 0
        finally:
            unloaded = http.delete("/admin/models/ported")
    assert unloaded.status_code == 200
    assert unloaded.json()["name"] == "ported" and unloaded.json()["unload_seconds"] >= 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_reload_comes_from_the_host_cache(server, shared_model):
    with server.http() as http:
        first = http.post("/admin/models", json={"name": "cached", "path": OTHER_CHECKPOINT})
        assert first.status_code == 200, first.text
        http.delete("/admin/models/cached").raise_for_status()
        again = http.post("/admin/models", json={"name": "cached", "path": OTHER_CHECKPOINT})
        assert again.status_code == 200, again.text
        http.delete("/admin/models/cached").raise_for_status()
    assert again.json()["source"] == "host-cache"


def test_metrics_parse_and_move(server, shared_model):
    before = server.metric_samples()
    server.openai().completions.create(model=shared_model, prompt="Count", max_tokens=4)
    with server.http() as http:
        loaded = http.post("/admin/models", json={"name": "metered", "path": OTHER_CHECKPOINT})
        assert loaded.status_code == 200, loaded.text
        http.delete("/admin/models/metered").raise_for_status()
    after = server.metric_samples()
    assert all(name.startswith("warmserve_") for name, _ in after)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ok = {"model": shared_model, "route": "/v1/completions", "status": "200"}
    assert delta("warmserve_requests_total", **ok) == 1
    assert delta("warmserve_prompt_tokens_total", model=shared_model) > 0
    generated = delta("warmserve_generation_tokens_total", model=shared_model)
    assert 1 <= generated <= 4
    # One prefill, then a decode step per further token (eager: a CPU has no CUDA graphs).
    steps = "warmserve_engine_step_seconds_count"
    assert delta(steps, model=shared_model, kind="prefill") == 1
    assert delta(steps, model=shared_model, kind="decode-eager") == generated - 1
    assert delta("warmserve_engine_step_seconds_sum", model=shared_model, kind="prefill") > 0
    assert delta("warmserve_time_to_first_token_seconds_count", model=shared_model) == 1
    source = loaded.json()["source"]
    assert delta("warmserve_model_load_seconds_count", source=source) == 1
    assert delta("warmserve_model_unload_seconds_count") == 1
    states = {
        labels: value for (name, labels), value in after.items() if name == "warmserve_worker_state"
    }
    assert sum(states.values()) == 2  # each worker is in exactly one state
    assert after[("warmserve_host_cache_bytes", ())] > 0


def run_cli(server, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(WARMSERVE_API_KEY=api_key or server.api_key)
    return subprocess.run(
        [sys.executable, "-m", "warmserve", *args, "--url", server.url],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_load_ps_unload(server, shared_model):
    loaded = run_cli(server, "load", "cli-model", OTHER_CHECKPOINT, "--dtype", "float32")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("loaded cli-model on worker(s)")
    try:
        listing = run_cli(server, "ps")
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:3] == ["MODEL", "STATE", "WORKERS"]
        assert any(line.split()[:2] == ["cli-model", "loaded"] for line in lines)
        header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
        assert lines[header].split()[:6] == ["WORKER", "PID", "NODE", "DEVICE", "STATE", "MODELS"]
        # Each worker row names its node (this host) and its resident models with what each
        # takes there.
        assert all(line.split()[2] == "local" for line in lines[header + 1 :]), lines
        workers = "\n".join(lines[header + 1 :])
        assert re.search(r"cli-model \(\d+(\.\d+)? [KMG]i?B\)", workers), workers
        assert f"{shared_model} (" in workers, workers
    finally:
        unloaded = run_cli(server, "unload", "cli-model")
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.startswith("unloaded cli-model in")


def test_cli_errors_are_one_line_and_non_zero(server):
    missing = run_cli(server, "unload", "no-such-model")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "model_not_found" in missing.stderr
    unauthorised = run_cli(server, "ps", api_key="wrong")
    assert unauthorised.returncode == 1 and "invalid_api_key" in unauthorised.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "warmserve", "ps", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot reach warmserve" in unreachable.stderr

"""Fuzzing a real server from its own OpenAPI schema with schemathesis: requests that fit the
schema and requests that break it, on every OpenAI and admin route. No answer may be a 5xx or
carry a stack trace, and the server must serve normally afterwards. Run with -s for figures."""

from __future__ import annotations

import os
from collections import Counter
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from server_process import serving, unload_everything

pytestmark = pytest.mark.slow

# Generated requests per operation and generation mode (positive, and negative where the
# operation takes a body): about 1,300 requests in all.
EXAMPLES = int(os.environ.get("WARMSERVE_FUZZ_EXAMPLES", "120"))
MINIMUM_REQUESTS = 1000
MODEL = "m"
REGISTRY = f"models:\n  - name: {MODEL}\n    path: tiny-llama\n"
# Where to undo what a fuzzed request created.
CLEAN_UP = {"POST /admin/models": "/admin/models", "POST /admin/registry": "/admin/registry"}
# Generation stays short so that the fuzzing takes seconds, not minutes.
MAX_FUZZED_TOKENS = 32


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    with serving(model_root, tmp_path_factory.mktemp("fuzz"), registry=REGISTRY) as running:
        yield running


def aim_some_at_real_targets(label: str, strategy):
    """Random names and paths almost never exist, so the requests would stop at a 404: half of
    them name the registered model (generation) or a real checkpoint (admin) instead."""

    def aim(case_and_flag):
        case, aimed = case_and_flag
        body = case.body
        if not aimed or not isinstance(body, dict):
            return case
        if label.startswith("POST /v1/"):
            body["model"] = MODEL
            for field in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(field), int) and body[field] > MAX_FUZZED_TOKENS:
                    body[field] = MAX_FUZZED_TOKENS
        elif label in ("POST /admin/models", "POST /admin/registry"):
            body["path"] = "tiny-qwen3"
        return case

    return st.tuples(strategy, st.booleans()).map(aim)


def fuzz(url, session, operation, mode, takes_input) -> list[tuple[int, str | None]]:
    """Sends the generated requests for one operation in one mode: (status, problem) each."""
    answers = []
    strategy = aim_some_at_real_targets(
        operation.label, operation.as_strategy(generation_mode=mode)
    )

    @given(case=strategy)
    @settings(
        # Operations without input have only one request to make.
        max_examples=EXAMPLES if takes_input else 5,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case):
        response = case.call(base_url=url, session=session, timeout=120)
        problem = None
        if response.status_code >= 500 or "Traceback (most recent call last)" in response.text:
            problem = f"{operation.label} {mode.value} {response.status_code}: {case.body!r:.300}"
            problem += f" -> {response.text[:300]}"
        answers.append((response.status_code, problem))
        if response.status_code == 200 and operation.label in CLEAN_UP:
            # Fuzzed loads would otherwise pile up until no worker is left for the next one.
            name = quote(case.body["name"], safe="")
            session.delete(f"{url}{CLEAN_UP[operation.label]}/{name}", timeout=120)

    call()
    return answers


def test_fuzzing_the_schema_finds_no_server_error(server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    schema = schemathesis.openapi.from_dict(
        httpx.get(f"{server.url}/openapi.json", headers=auth).json()
    )
    pids = server.worker_pids()
    session = requests.Session()
    session.headers.update(auth)
    statuses: Counter = Counter()  # by status code
    problems: list[str] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(operation.body) or bool(operation.path_parameters)
        # A free-form path parameter has no invalid values: only bodies can break the schema.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            for status, answer in fuzz(server.url, session, operation, mode, takes_input):
                statuses[status] += 1
                if answer is not None:
                    problems.append(answer)

    total = sum(statuses.values())
    print(f"\nfuzz: {total} requests, by status {dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(problems[:10])
    assert total >= MINIMUM_REQUESTS
    assert statuses[200] > 0, "nothing reached a model"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert server.worker_pids() == pids
    with server.http() as http:
        unload_everything(http)  # what the fuzzer loaded may hold both workers
        # A fuzzed registration or unregistration may have named the model: register it anew.
        http.delete(f"/admin/registry/{MODEL}")
        registered = http.post("/admin/registry", json={"name": MODEL, "path": "tiny-llama"})
        assert registered.status_code == 200, registered.text
        response = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}
        )
    assert response.status_code == 200, response.text

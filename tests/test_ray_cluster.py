"""The worker pool on a Ray cluster: a real `warmserve serve --ray-address` over a local cluster of
two nodes that the test starts (each node with a resource of its own, so they can be told
apart), then a node killed while serving and a node that joins."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_process import serving, subprocess_env
from support import hf_greedy
from tokenizers import Tokenizer

from warmserve.cli import main
from warmserve.controller.shared_memory import remove_stale_instances

cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow

# Both tiny models fit on one worker side by side, so a model lost with its node reloads on the
# worker that remains.
TWO_MODELS_PER_WORKER_GB = "0.12"
REGISTRY = (
    "models:\n  - name: on-head\n    path: tiny-llama\n  - name: on-second\n    path: tiny-qwen3\n"
)
# Ray's processes are kept small: CI machines have 24 GiB for everything.
NODE_OPTIONS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
PROMPT = "Once upon a time in a land far away"


@pytest.fixture
def cluster():
    """A local Ray cluster of two nodes, shut down (and its shared memory removed) after."""
    started = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={**NODE_OPTIONS, "resources": {"head": 1}, "include_dashboard": False},
    )
    try:
        second = started.add_node(**NODE_OPTIONS, resources={"second": 1})
        yield started, second
    finally:
        started.shutdown()
        remove_stale_instances()  # the store segments of the node that was killed


def complete(http: httpx.Client, model: str, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition, what: str, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def model_state(http: httpx.Client, name: str) -> dict:
    return next(m for m in http.get("/admin/models").json() if m["name"] == name)


def test_workers_spread_over_the_nodes_a_lost_node_takes_only_its_models_a_new_one_joins(
    cluster, model_root, tmp_path, capsys
):
    ray_cluster, second = cluster
    tokenizer = Tokenizer.from_file(str(model_root / "tiny-qwen3" / "tokenizer.json"))
    prompt_ids = tokenizer.encode(PROMPT).ids
    expected = tokenizer.decode(
        hf_greedy(model_root / "tiny-qwen3", prompt_ids, 8), skip_special_tokens=True
    )
    options = ("--ray-address", ray_cluster.address, "--worker-memory-gb", TWO_MODELS_PER_WORKER_GB)
    with (
        serving(model_root, tmp_path, registry=REGISTRY, extra_args=options) as server,
        server.http() as http,
    ):
        workers = http.get("/admin/workers").json()
        nodes = [worker["node"] for worker in workers]
        assert len(set(nodes)) == 2 and second.node_id in nodes, workers
        complete(http, "on-head", prompt_ids, 4)  # the most free memory: worker 0
        # Then worker 1 has the most free memory: on-second goes to the second node.
        answer = complete(http, "on-second", prompt_ids, 8)
        assert answer["choices"][0]["text"] == expected
        on_second = model_state(http, "on-second")
        assert workers[on_second["workers"][0]]["node"] == second.node_id
        assert main(["ps", "--url", server.url, "--api-key", server.api_key]) == 0
        listing = capsys.readouterr().out
        assert "NODE" in listing and second.node_id[:12] in listing

        # A stream on the head node runs while the second node dies.
        streamed: dict = {}

        def stream_on_head() -> None:
            body = {"model": "on-head", "prompt": prompt_ids, "max_tokens": 300,
                    "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
            with (
                server.http() as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                streamed["status"] = response.status_code
                streamed["lines"] = [line for line in response.iter_lines() if line]

        streaming = threading.Thread(target=stream_on_head)
        streaming.start()
        ray_cluster.remove_node(second, allow_graceful=False)
        wait_for(lambda: model_state(http, "on-second")["state"] == "failed", "on-second failed")
        streaming.join(timeout=120)
        assert streamed["status"] == 200 and streamed["lines"][-1] == "data: [DONE]"
        assert http.get("/health").status_code == 200
        assert model_state(http, "on-head")["state"] == "loaded"

        # Its next request loads it again, on the node that remains.
        answer = complete(http, "on-second", prompt_ids, 8)
        assert answer["choices"][0]["text"] == expected
        reloaded = model_state(http, "on-second")
        workers = http.get("/admin/workers").json()
        assert workers[reloaded["workers"][0]]["node"] != second.node_id
        assert [w["state"] for w in workers if w["node"] == second.node_id] == ["dead"]

        # A node that joins adds its worker to the pool.
        third = ray_cluster.add_node(**NODE_OPTIONS, resources={"third": 1})
        wait_for(
            lambda: any(
                w["node"] == third.node_id and w["state"] == "ready"
                for w in http.get("/admin/workers").json()
            ),
            "a worker on the node that joined",
        )

        # No node has two workers: a tensor-parallel pair spans two nodes, each rank copying
        # from its own node's store (the registered models make room), the lead sending its
        # steps to the other rank's CURVE-secured tcp:// inbox. Its reload copies each rank's
        # shard from the store of the rank's node.
        opt_tokenizer = Tokenizer.from_file(str(model_root / "tiny-opt" / "tokenizer.json"))
        opt_prompt = opt_tokenizer.encode(PROMPT).ids
        reference = opt_tokenizer.decode(
            hf_greedy(model_root / "tiny-opt", opt_prompt, 8), skip_special_tokens=True
        )
        wide = {"name": "wide", "path": "tiny-opt", "tensor_parallel_size": 2}
        for source in ("disk", "host-cache"):
            loaded = http.post("/admin/models", json=wide)
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["source"] == source
            workers = http.get("/admin/workers").json()
            assert len({workers[w]["node"] for w in loaded.json()["workers"]}) == 2
            assert complete(http, "wide", opt_prompt, 8)["choices"][0]["text"] == reference
            assert http.delete("/admin/models/wide").status_code == 200
        assert "did not store their shards" not in server.log_path.read_text()


def test_without_a_ray_address_ray_is_not_imported(model_root):
    """The local pool starts and loads a model without importing Ray."""
    probe = (
        "import asyncio, sys\n"
        "from warmserve import Controller, ServerConfig\n"
        "async def main():\n"
        "    async with Controller(ServerConfig(device='cpu', workers=1)) as controller:\n"
        f"        await controller.load('m', {str(model_root / 'tiny-llama')!r})\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=180,
        env=subprocess_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"

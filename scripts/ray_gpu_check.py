"""The worker pool on a Ray cluster, on GPUs (run on a GPU host with Ray installed, not in CI):

1. a one-node Ray cluster holding every GPU of this host: one worker actor per GPU, each worker
   on its own GPU (Ray's CUDA_VISIBLE_DEVICES; the worker sees it as cuda:0);
2. a Qwen3-0.6B-shaped model (bf16) on the Ray pool gives the same greedy tokens as on a local
   pool (the same kernels: only the launcher differs), and its reload from the node's host store
   takes what a local reload takes (the segment registered for DMA in the actor's worker);
3. with two GPUs or more: the same with tensor_parallel_size=2 (NCCL between two actors' worker
   processes, each seeing one GPU).

    pip install 'ray==2.60.0'   # warmserve[ray]
    python scripts/ray_gpu_check.py

Prints one line per check ("ok" or "FAILED") and the reload times; exits 1 if a check failed.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from warmserve import Controller, SamplingParams, ServerConfig
from warmserve.config import EngineConfig
from warmserve.testing.checkpoints import ensure_checkpoint

PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], list(range(100, 160))]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ENGINE = EngineConfig(max_kv_cache_bytes=2**30)


async def run_pool(config: ServerConfig, path: Path, tp: int) -> dict:
    """Workers, greedy tokens and the median of five host-store reloads of the model."""
    async with Controller(config) as controller:
        workers = [(w.id, w.node[:12], w.device, w.pid) for w in controller.workers()]
        await controller.load("m", str(path), tensor_parallel_size=tp, max_model_len=1024)
        tokens = []
        for prompt in PROMPTS:
            ids = []
            async for chunk in controller.generate("m", prompt, GREEDY):
                ids += chunk.token_ids
            tokens.append(ids)
        reloads = []
        for _ in range(5):
            await controller.unload("m")
            result = await controller.load(
                "m", str(path), tensor_parallel_size=tp, max_model_len=1024
            )
            assert result.source == "host-cache", result
            reloads.append(result.load_seconds)
        return {"workers": workers, "tokens": tokens, "reload_s": statistics.median(reloads)}


def main() -> int:
    from ray.cluster_utils import Cluster

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("no GPU visible")
        return 1
    path = ensure_checkpoint(
        Path(tempfile.gettempdir()) / "warmserve-ray-gpu-check" / "qwen3-0.6b",
        "qwen3",
        "qwen3-0.6b",
        dtype="bfloat16",
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_gpus": gpus, "num_cpus": 4, "include_dashboard": False},
    )
    failed = False

    def check(name: str, passed: bool, detail: str = "") -> None:
        nonlocal failed
        failed |= not passed
        print(f"{'ok' if passed else 'FAILED'}: {name} {detail}")

    try:
        on_ray = ServerConfig(device="cuda", ray_address=cluster.address, engine=ENGINE)
        local = ServerConfig(device="cuda", engine=ENGINE)
        for tp in (1, 2) if gpus >= 2 else (1,):
            ray_run = asyncio.run(run_pool(on_ray, path, tp))
            local_run = asyncio.run(run_pool(local, path, tp))
            print(f"tp={tp} Ray workers: {ray_run['workers']}")
            check(
                f"tp={tp}: one worker per GPU",
                len(ray_run["workers"]) == gpus
                and len({pid for *_, pid in ray_run["workers"]}) == gpus,
            )
            check(f"tp={tp}: greedy tokens equal", ray_run["tokens"] == local_run["tokens"])
            print(
                f"tp={tp}: host-store reload {ray_run['reload_s'] * 1e3:.1f} ms on Ray, "
                f"{local_run['reload_s'] * 1e3:.1f} ms local"
            )
            check(
                f"tp={tp}: reload on Ray within 2x of local",
                ray_run["reload_s"] <= 2 * local_run["reload_s"] + 0.005,
            )
    finally:
        cluster.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

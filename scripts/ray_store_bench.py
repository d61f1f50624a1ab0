"""A model's reload from the host store of a remote Ray node against the same reload on a local
server (CPU workers). Prints one row per setup: the median of the reloads' times.

    python scripts/ray_store_bench.py [--shape qwen3-0.6b] [--repeats 5]

On the cluster (two nodes of a local `ray.cluster_utils.Cluster`, the server on the head), a
small model is loaded first so that the measured one lands on the second node's worker; its
reloads then copy from that node's store (placement prefers the node holding it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from warmserve import Controller, ServerConfig
from warmserve.config import EngineConfig
from warmserve.testing.checkpoints import ensure_checkpoint

GIB = 2**30
# A small KV cache: the figure is the weights' copy, and two CPU workers share this host.
ENGINE = EngineConfig(max_kv_cache_bytes=GIB // 4)


async def reloads(config: ServerConfig, path: Path, ballast: Path | None, repeats: int):
    async with Controller(config) as controller:
        if ballast is not None:
            await controller.load("ballast", str(ballast))
        first = await controller.load("m", str(path), max_model_len=512)
        node = next(w.node for w in controller.workers() if w.id == first.workers[0])
        await controller.unload("m")
        seconds, copies = [], []
        for _ in range(repeats):
            result = await controller.load("m", str(path), max_model_len=512)
            assert result.source == "host-cache", result
            seconds.append(result.load_seconds)
            copies.append(result.worker_phases["weights_s"])
            await controller.unload("m")
        return first, node, statistics.median(seconds), statistics.median(copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    root = Path(tempfile.gettempdir()) / "warmserve-ray-store-bench"
    path = ensure_checkpoint(root / args.shape, "qwen3", args.shape)
    ballast = ensure_checkpoint(root / "tiny", "llama")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rows = []
    local = ServerConfig(device="cpu", workers=1, worker_memory_gb=4, engine=ENGINE)
    rows.append(("local server", *asyncio.run(reloads(local, path, None, args.repeats))))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20},
    )
    try:
        second = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        remote = ServerConfig(
            device="cpu", workers=2, worker_memory_gb=4, engine=ENGINE, ray_address=cluster.address
        )
        first, node, *times = asyncio.run(reloads(remote, path, ballast, args.repeats))
        assert node == second.node_id, "the model did not land on the second node"
        rows.append(("Ray, second node's store", first, node, *times))
    finally:
        cluster.shutdown()
    print(f"{args.shape}: {size / GIB:.2f} GiB of weights, median of {args.repeats} reloads")
    print("| setup | first load (disk) s | reload s | worker copy s | copy GB/s |")
    print("|---|---|---|---|---|")
    for name, first, _, reload_s, copy_s in rows:
        print(
            f"| {name} | {first.load_seconds:.2f} | {reload_s:.3f} | {copy_s:.3f} "
            f"| {size / copy_s / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()

"""Two GPUs, one warm worker each (run on a 2-GPU machine, not in CI):

1. two models (OPT-125m and Qwen3-0.6B shapes, bf16) side by side, generating concurrently, each
   equal to its single-GPU output;
2. one Llama-3.1-8B-shaped model with tensor_parallel_size=2 over NCCL (the group is formed at
   load among the running workers and destroyed at unload), then two single-GPU models on the same
   workers, then TP=2 again; the pids never change; greedy TP=2 against TP=1;
3. figures: TP=2 load from disk and from the host cache against the two-GPU copy floor, swap
   time, decode step time TP=1 against TP=2 at batch 1 and 64.

    python scripts/two_gpu_check.py --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from warmserve import Controller, SamplingParams, ServerConfig
from warmserve.bench.swap import wait_for_memory_release
from warmserve.config import EngineConfig
from warmserve.testing.checkpoints import ensure_checkpoint

PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], list(range(100, 160)), [7], list(range(300, 317))]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
GIB = 2**30


def two_gpu_copy_floor_gbps(size: int = GIB) -> float:
    """Aggregate GB/s of pinned host-to-device copies into both GPUs at once."""
    sources = [torch.empty(size, dtype=torch.uint8).pin_memory() for _ in range(2)]
    targets = [torch.empty(size, dtype=torch.uint8, device=f"cuda:{i}") for i in range(2)]
    times = []
    for _ in range(5):
        for i in range(2):
            torch.cuda.synchronize(i)
        started = time.perf_counter()
        for i in range(2):
            targets[i].copy_(sources[i], non_blocking=True)
        for i in range(2):
            torch.cuda.synchronize(i)
        times.append(time.perf_counter() - started)
    return 2 * size / statistics.median(times[1:]) / 1e9


async def generate(controller, name, prompt, params=GREEDY) -> list[int]:
    tokens = []
    async for chunk in controller.generate(name, prompt, params):
        tokens.extend(chunk.token_ids)
    return tokens


async def outputs(controller, name) -> list[list[int]]:
    return list(await asyncio.gather(*(generate(controller, name, p) for p in PROMPTS)))


async def decode_step_ms(controller, name: str, batch: int) -> float:
    """Median gap between a stream's tokens with `batch` streams in flight (512-token prompts)."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    context = min(512, controller.model(name).max_model_len - 48)
    gaps: list[float] = []

    async def one(index: int) -> None:
        prompt = [(index * 7 + i) % 500 for i in range(context)]
        last = None
        async for _ in controller.generate(name, prompt, params):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    await asyncio.gather(*(one(i) for i in range(batch)))
    gaps.sort()
    return 1e3 * statistics.median(gaps[len(gaps) // 4 :])  # past prefill hiccups


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


async def run(out: Path, rehearsal: bool) -> dict:
    """`rehearsal`: the same steps on two CPU workers with tiny shapes, to catch mistakes before
    a GPU machine is spent on them."""
    root = Path("/tmp/two-gpu-checkpoints" + ("-rehearsal" if rehearsal else ""))
    dtype = "float32" if rehearsal else "bfloat16"

    def shape(real: str) -> str:
        return "tiny" if rehearsal else real

    opt = ensure_checkpoint(root / "opt", "opt", shape("opt-125m"), dtype=dtype, seed=1)
    qwen = ensure_checkpoint(root / "qwen", "qwen3", shape("qwen3-0.6b"), dtype=dtype, seed=1)
    llama = ensure_checkpoint(
        root / "llama", "llama", shape("llama-3.1-8b"), dtype=dtype, seed=1, sharded=True
    )
    llama_bytes = sum(f.stat().st_size for f in llama.glob("*.safetensors"))
    report: dict = {"two_gpu_copy_floor_gbps": 1.0 if rehearsal else two_gpu_copy_floor_gbps()}
    # The KV cache is elastic: each worker's pool takes what the weights leave free.
    engine = EngineConfig()
    config = ServerConfig(
        device="cpu" if rehearsal else "cuda", workers=2, host_cache_gb=64, engine=engine
    )
    async with Controller(config) as controller:
        pids = [w.pid for w in controller.workers()]
        report["workers"] = [(w.id, w.pid, w.device) for w in controller.workers()]

        # 1. single-GPU references, then both models side by side.
        await controller.load("opt", str(opt))
        opt_alone = await outputs(controller, "opt")
        await controller.unload("opt")
        await controller.load("qwen", str(qwen))
        qwen_alone = await outputs(controller, "qwen")
        await controller.unload("qwen")
        await controller.load("opt", str(opt))
        await controller.load("qwen", str(qwen))
        report["side_by_side_workers"] = {
            m.name: m.workers for m in controller.models() if m.state == "loaded"
        }
        together = await asyncio.gather(outputs(controller, "opt"), outputs(controller, "qwen"))
        report["side_by_side_equal_to_alone"] = [
            together[0] == opt_alone,
            together[1] == qwen_alone,
        ]
        await controller.unload("opt")
        await controller.unload("qwen")

        # 2. TP=1 reference on one GPU (this also puts the 8B weights in the host store).
        single = await controller.load("llama-tp1", str(llama))
        report["tp1_load_disk_s"] = single.load_seconds
        tp1 = await outputs(controller, "llama-tp1")
        report["tp1_decode_ms"] = {
            b: await decode_step_ms(controller, "llama-tp1", b) for b in (1, 64)
        }
        await controller.unload("llama-tp1")

        # TP=2 from the host cache, then from disk (the store's copy evicted first).
        cached = await controller.load("llama-tp2", str(llama), tensor_parallel_size=2)
        report["tp2_load_host_cache_s"] = cached.load_seconds
        report["tp2_load_source"] = cached.source
        tp2 = await outputs(controller, "llama-tp2")
        report["tp2_equal_tp1"] = [a == b for a, b in zip(tp1, tp2, strict=True)]
        report["tp2_first_divergence"] = [
            first_divergence(a, b) for a, b in zip(tp1, tp2, strict=True)
        ]
        report["tp2_decode_ms"] = {
            b: await decode_step_ms(controller, "llama-tp2", b) for b in (1, 64)
        }
        await controller.unload("llama-tp2")
        controller.store.evict(str(llama))
        disk = await controller.load("llama-tp2", str(llama), tensor_parallel_size=2)
        report["tp2_load_disk_s"] = disk.load_seconds
        await controller.unload("llama-tp2")

        # The same workers serve two single-GPU models again, then TP=2 again.
        await controller.load("opt", str(opt))
        await controller.load("qwen", str(qwen))
        again = await asyncio.gather(outputs(controller, "opt"), outputs(controller, "qwen"))
        report["single_gpu_after_tp2_equal"] = [again[0] == opt_alone, again[1] == qwen_alone]
        await controller.unload("opt")
        await controller.unload("qwen")
        swaps = []
        await controller.load("llama-tp2", str(llama), tensor_parallel_size=2)
        for _ in range(3):
            started = time.perf_counter()
            await controller.unload("llama-tp2")
            await controller.load("llama-tp2", str(llama), tensor_parallel_size=2)
            await generate(controller, "llama-tp2", PROMPTS[0], SamplingParams(max_tokens=1))
            swaps.append(time.perf_counter() - started)
        report["tp2_swap_s"] = {"median": statistics.median(swaps), "min": min(swaps)}
        report["tp2_again_equal"] = (await outputs(controller, "llama-tp2")) == tp2
        await controller.unload("llama-tp2")
        report["pids_unchanged"] = [w.pid for w in controller.workers()] == pids
        report["memory_released_after_s"] = await wait_for_memory_release(controller)
        report["memory_after_unload_minus_idle_mib"] = [
            (w.memory_used_bytes - w.memory_idle_bytes) / 2**20 for w in controller.workers()
        ]
    floor = llama_bytes / report["two_gpu_copy_floor_gbps"] / 1e9
    report["llama_gib"] = llama_bytes / GIB
    report["tp2_copy_floor_s"] = floor
    out.mkdir(parents=True, exist_ok=True)
    (out / "two_gpu.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="two-gpu-out")
    parser.add_argument("--rehearsal", action="store_true", help="CPU workers, tiny shapes")
    args = parser.parse_args()
    report = asyncio.run(run(Path(args.out), args.rehearsal))
    for key, value in report.items():
        print(f"{key:40s} {value}")


if __name__ == "__main__":
    main()

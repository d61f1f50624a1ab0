"""`warmserve bench`: swap, load and decode figures, each against a baseline measured in the same
run (the machines are noisy; ratios travel, absolute numbers do not).

Per checkpoint shape: the pinned host-to-device copy floor of its bytes, a hand-written swap in a
warm process (transformers model built on the GPU, pinned state dict copied in, first token), a
fresh transformers process to its first token, and warmserve's load from disk and from the host
cache, unload, swap (unload A + load B from the host cache + B's first token), decode step time at
batch 1 and 64 against transformers `generate` and the HBM floor of a step, and GPU memory after
an unload against the idle worker's. Results go to a JSON file and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from warmserve.bench.options import SWAP_QUICK_SHAPES, SWAP_SHAPES
from warmserve.bench.report import update_section
from warmserve.bench.swap_report import render_markdown
from warmserve.config import GIB, EngineConfig, SamplingParams, ServerConfig
from warmserve.testing.checkpoints import ensure_checkpoint

SWAP_PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]  # the 8-token prompt of a swap's first token


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "n": len(samples)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- floors ------------------------------------------------------------------------------


def host_to_device_bandwidth(device: str, size: int = GIB) -> float:
    """GB/s of a copy from pinned host memory (on CPU: a plain memory copy)."""
    source = torch.empty(size, dtype=torch.uint8).pin_memory() if device == "cuda" else None
    if source is None:
        source = torch.empty(size, dtype=torch.uint8)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source, non_blocking=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times[1:]) / 1e9


def memory_bandwidth(device: str, size: int = 2 * GIB) -> float:
    """GB/s of a large device-to-device copy, bytes read plus bytes written."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size / statistics.median(times[1:]) / 1e9


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_read_bandwidth(checkpoint: Path) -> float:
    """GB/s reading the checkpoint's safetensors files with large reads, as the store does."""
    files = sorted(checkpoint.glob("*.safetensors"))
    total, started = 0, time.perf_counter()
    buffer = bytearray(64 * 2**20)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total / (time.perf_counter() - started) / 1e9


# ---- baselines without warmserve ---------------------------------------------------------


def handwritten_swap(checkpoint: Path, device: str, repeats: int) -> dict:
    """The best swap a user could write in a warm process: build the transformers model on the
    GPU, copy a pinned state dict into it, run the first token; then free it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    state = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        state.update({k: v.pin_memory() for k, v in load_file(file).items()})
    config = AutoConfig.from_pretrained(checkpoint)
    prompt = torch.tensor([SWAP_PROMPT], device=device)
    loads, frees = [], []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        params = model.state_dict()
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor, non_blocking=True)
        with torch.inference_mode():
            model(prompt).logits[0, -1].argmax().item()
        loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        del model, params
        torch.cuda.empty_cache()
        frees.append(time.perf_counter() - started)
    return {"load_first_token_s": summary(loads[1:]), "free_s": summary(frees[1:])}


FRESH_PROCESS = """
import sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]], device="cuda")
print(model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item(), flush=True)
"""


def fresh_transformers_process(checkpoint: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


# ---- warmserve through the controller ----------------------------------------------------


async def controller_timings(a: Path, b: Path, device: str, repeats: int, cold: bool) -> dict:
    from warmserve import Controller

    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    check = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    config = ServerConfig(device=device, workers=1, host_cache_gb=256, worker_memory_gb=64)

    async def first_token(controller, name) -> list[int]:
        tokens = []
        async for chunk in controller.generate(name, SWAP_PROMPT, greedy):
            tokens.extend(chunk.token_ids)
        return tokens

    async def text(controller, name) -> list[int]:
        tokens = []
        async for chunk in controller.generate(name, SWAP_PROMPT, check):
            tokens.extend(chunk.token_ids)
        return tokens

    async with Controller(config) as controller:
        idle = controller.workers()[0].memory_used_bytes
        # B first, untimed: the worker's first kernels at this shape are loaded from the CUDA
        # libraries now, not from a cold disk during A's timed load.
        await controller.load("b", str(b))
        reference_b = await text(controller, "b")
        await controller.unload("b")
        result: dict = {"page_cache": "cold" if cold and drop_page_cache() else "warm"}
        disk = await controller.load("a", str(a))
        result["load_disk_s"] = disk.load_seconds
        reference_a = await text(controller, "a")
        await controller.unload("a")
        if device == "cuda":  # reloads copy from registered memory once the worker has it
            deadline = time.monotonic() + 600
            while len(controller.registered_segments) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        loads, first_tokens, unloads, swaps, phases, unload_phases = [], [], [], [], [], []
        await controller.load("a", str(a))
        current = "a"
        await first_token(controller, current)  # A has served (and its copy has landed)
        for _ in range(repeats):
            target = "b" if current == "a" else "a"
            started = time.perf_counter()
            await controller.unload(current)
            unloaded = time.perf_counter()
            unload_phases.append(controller.last_unload_phases)
            loaded = await controller.load(target, str(a if target == "a" else b))
            assert loaded.source == "host-cache"
            phases.append(loaded.worker_phases)
            reloaded = time.perf_counter()
            await first_token(controller, target)
            done = time.perf_counter()
            swaps.append(done - started)
            unloads.append(unloaded - started)
            loads.append(reloaded - unloaded)
            # The load returns once its copy is issued: the first token waits for the rest.
            first_tokens.append(done - reloaded)
            current = target
        same_a = (await text(controller, current)) == (
            reference_a if current == "a" else reference_b
        )
        await controller.unload(current)
        released_after = await wait_for_memory_release(controller)
        after = controller.workers()[0].memory_used_bytes
        result.update(
            load_host_cache_s=summary(loads),
            unload_s=summary(unloads),
            first_token_s=summary(first_tokens),
            swap_s=summary(swaps),
            output_unchanged_after_swaps=same_a,
            memory_idle_bytes=idle,
            memory_after_unload_bytes=after,
            memory_released_after_s=released_after,
            worker_load_phases=phases,
            worker_unload_phases=unload_phases,
        )
        return result


async def wait_for_memory_release(controller, slack: int = 64 * 2**20, limit_s: float = 10.0):
    """Seconds until every worker is back within `slack` of its idle memory: an unload hands its
    memory to the driver after the release delay (a load in between would have reused it)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s and any(
        worker.memory_used_bytes > worker.memory_idle_bytes + slack
        for worker in controller.workers()
    ):
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# ---- decode --------------------------------------------------------------------------------


def decode_timings(
    checkpoint: Path,
    device: str,
    batches: tuple[int, ...],
    context: int,
    steps: int,
    hbm_gbps: float | None = None,
    dtype: str = "auto",
    **engine_flags: bool,
) -> dict:
    """Median step time of a full decode batch per batch size; with `hbm_gbps`, also the time
    the step's bytes (weights + KV cache read) take at that bandwidth. `engine_flags`: more
    EngineConfig fields (async_scheduling, batch_invariant)."""
    from warmserve.engine.engine_build import engine_from_checkpoint

    max_len = context + steps + 16
    engine = engine_from_checkpoint(
        checkpoint,
        device=device,
        dtype=dtype,
        max_model_len=max_len,
        # Room for every sequence's whole context: the step time of a full batch is measured.
        engine_config=EngineConfig(
            max_num_seqs=max(batches),
            max_num_batched_tokens=8192,
            **engine_flags,
        ),
    )
    kv_per_token = engine.kv_region.block_bytes // engine.scheduler.block_manager.block_size
    generator = torch.Generator().manual_seed(0)
    vocab = min(engine.vocab_size, 1000)
    results = {}
    for batch in batches:
        prompts = torch.randint(0, vocab, (batch, context), generator=generator).tolist()
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        for index, prompt in enumerate(prompts):
            engine.add_request(f"{batch}-{index}", prompt, params)
        while engine.has_idle_work():  # as the worker does in its idle gaps
            engine.do_idle_work()
        while any(seq.num_output_tokens == 0 for seq in engine.sequences.values()):
            engine.step()  # prefills
        for _ in range(3):
            engine.step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        for request_id in list(engine.sequences):
            engine.abort_request(request_id)
        step = statistics.median(times)
        results[batch] = {
            "step_ms": step * 1e3,
            "step_min_ms": min(times) * 1e3,
            "tokens_per_s": batch / step,
        }
        if hbm_gbps:
            step_bytes = engine.weights_bytes + batch * (context + steps) * kv_per_token
            results[batch]["memory_floor_ms"] = step_bytes / hbm_gbps / 1e6
    engine.close()
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def transformers_decode(checkpoint: Path, device: str, batches, context: int, steps: int) -> dict:
    """Per-token time of transformers `generate` (greedy): the difference of two lengths, so the
    prefill cancels out."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").to(device).eval()
    model.generation_config.eos_token_id = None
    generator = torch.Generator().manual_seed(0)
    results = {}
    for batch in batches:
        vocab = min(model.config.vocab_size, 1000)
        ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)

        _generate_seconds(model, ids, 2, device)  # warm-up
        short = _generate_seconds(model, ids, 2, device)
        long = _generate_seconds(model, ids, 2 + steps, device)
        step = max(long - short, 1e-9) / steps
        results[batch] = {"step_ms": step * 1e3, "tokens_per_s": batch / step}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )
    synchronize(device)
    return time.perf_counter() - started


# ---- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SWAP_QUICK_SHAPES if args.quick else SWAP_SHAPES
    if args.shapes:
        shapes = {name: shapes.get(name) or SWAP_SHAPES[name] for name in args.shapes}
    dtype = "bfloat16" if device == "cuda" else "float32"
    repeats = 3 if args.quick else args.repeats
    batches = (1, 4) if args.quick else (1, 64)
    context, steps = (64, 8) if args.quick else (512, 32)
    root = Path(args.checkpoints)
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": "warmserve bench " + " ".join(sys.argv[2:]),
        "h2d_gbps": host_to_device_bandwidth(device),
        "memory_gbps": memory_bandwidth(device),
        "shapes": {},
    }
    print(
        f"host-to-device {results['h2d_gbps']:.1f} GB/s, memory {results['memory_gbps']:.0f} GB/s"
    )
    for shape, family in shapes.items():
        preset = "tiny" if shape.startswith("tiny") else shape
        big = shape == "llama-3.1-8b"
        a = ensure_checkpoint(root / f"{shape}-a", family, preset, dtype=dtype, seed=1, sharded=big)
        b = ensure_checkpoint(root / f"{shape}-b", family, preset, dtype=dtype, seed=2, sharded=big)
        nbytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
        entry: dict = {"bytes": nbytes, "floor_s": nbytes / results["h2d_gbps"] / 1e9}
        print(f"{shape}: {nbytes / GIB:.2f} GiB, copy floor {entry['floor_s'] * 1e3:.1f} ms")
        cold = drop_page_cache()
        entry["disk_read_gbps"] = disk_read_bandwidth(a)
        entry["disk_page_cache"] = "cold" if cold else "warm"
        entry["warmserve"] = asyncio.run(controller_timings(a, b, device, repeats, cold))
        entry["disk_load_gbps"] = nbytes / entry["warmserve"]["load_disk_s"] / 1e9
        if device == "cuda" and not args.quick:
            entry["handwritten"] = handwritten_swap(b, device, repeats)
            entry["fresh_transformers_s"] = fresh_transformers_process(a)
        entry["decode"] = decode_timings(a, device, batches, context, steps, results["memory_gbps"])
        entry["transformers_decode"] = transformers_decode(a, device, batches, context, steps)
        results["shapes"][shape] = entry
        print(json.dumps(entry, indent=1, default=str))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = render_markdown(results)
    # Its own section: the serving benchmarks' sections and hand-written text stay.
    update_section(Path(args.markdown), "warmserve bench", markdown)
    print(markdown)
    return 0

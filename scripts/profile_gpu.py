"""Where a swap's and a decode step's time goes on the GPU (a development tool, run through the
device machine): host-copy bandwidth by kind of host memory, the phases of an in-process
unload/load/first token, the first token's operations, and a decode step's kernels.

    python scripts/profile_gpu.py [--out DIR] [--parts copy swap decode]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

GIB = 2**30
MADV_HUGEPAGE = 14


def sync():
    torch.cuda.synchronize()


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def environment(report):
    for path in (
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
        "/proc/sys/vm/nr_hugepages",
    ):
        try:
            report[path] = Path(path).read_text().strip()
        except OSError as exc:
            report[path] = str(exc)
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "shm" in line]
    report["shm mounts"] = mounts


def copy_bandwidth(report, size=2 * GIB):
    from warmserve.loader.weight_store import _create_shm, _unlink

    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def gbps(source, chunk=None):
        def copy():
            if chunk is None:
                target.copy_(source, non_blocking=True)
            else:
                for start in range(0, size, chunk):
                    target[start : start + chunk].copy_(
                        source[start : start + chunk], non_blocking=True
                    )

        return size / timed(copy) / 1e9

    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    report["pinned (cudaHostAlloc)"] = gbps(pinned)
    report["pinned, 64 MiB chunks"] = gbps(pinned, 64 * 2**20)
    del target
    # As a swap does it: the target freed to the driver and allocated again before each copy,
    # then the same with the fresh target first written at device speed (a memset).
    for zeroed, label in ((False, "cudaMalloc"), (True, "cudaMalloc+memset")):
        allocations, copies = [], []
        for _ in range(5):
            torch.cuda.empty_cache()
            sync()
            started = time.perf_counter()
            fresh = torch.empty(size, dtype=torch.uint8, device="cuda")
            if zeroed:
                fresh.zero_()
                sync()
            allocated = time.perf_counter()
            fresh.copy_(pinned, non_blocking=True)
            sync()
            allocations.append(allocated - started)
            copies.append(time.perf_counter() - allocated)
            del fresh
        report[f"pinned into a fresh allocation: {label} ms, copy GB/s"] = [
            statistics.median(allocations) * 1e3,
            size / statistics.median(copies) / 1e9,
        ]
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    del pinned

    def registered(mapping, label):
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
        buffer.fill_(1)  # touch every page
        result = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 0)
        assert int(result) == 0, result
        report[label] = gbps(buffer)
        report[label + ", 64 MiB chunks"] = gbps(buffer, 64 * 2**20)
        report[label + ", 256 MiB chunks"] = gbps(buffer, 256 * 2**20)
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        del buffer

    name = f"profile-{os.getpid()}"
    mapping = _create_shm(name, size)
    registered(mapping, "registered shm (4 KiB pages)")
    mapping.close()
    _unlink(name)

    name = f"profile-huge-{os.getpid()}"
    mapping = _create_shm(name, size)
    address = ctypes.c_void_p.from_buffer(mapping)
    ok = libc.madvise(ctypes.c_void_p(ctypes.addressof(address)), ctypes.c_size_t(size), 14)
    del address
    report["madvise(MADV_HUGEPAGE) on shm"] = ok
    registered(mapping, "registered shm after MADV_HUGEPAGE")
    mapping.close()
    _unlink(name)

    anonymous = mmap.mmap(-1, size)
    registered(anonymous, "registered anonymous mmap")
    anonymous.close()
    smaps = Path("/proc/meminfo").read_text()
    report["meminfo huge"] = [
        line for line in smaps.splitlines() if "Huge" in line or "Shmem" in line
    ]


def swap_phases(report, root: Path, shape="qwen3-0.6b", family="qwen3", repeats=4):
    from warmserve.config import EngineConfig, SamplingParams
    from warmserve.engine.engine_build import build_engine, eos_token_ids
    from warmserve.engine.warmup import warm_up
    from warmserve.loader.checkpoint import Checkpoint
    from warmserve.loader.segment_weights import SegmentWeights
    from warmserve.loader.weight_store import HostWeightStore
    from warmserve.testing.checkpoints import ensure_checkpoint
    from warmserve.worker.worker import release_cached_gpu_memory

    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    warm_up(device, "bfloat16")
    release_cached_gpu_memory()
    store = HostWeightStore(64 * GIB, f"profile{os.getpid()}")
    weights = []
    for seed in (1, 2):
        path = ensure_checkpoint(
            root / f"{shape}-{seed}", family, shape, dtype="bfloat16", seed=seed
        )
        segment = store.store_checkpoint(str(path), Checkpoint(path))
        segment_weights = SegmentWeights(segment)
        segment_weights.register_for_dma()
        weights.append((path, segment_weights))
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []

    def first_token(engine, request_id):
        engine.add_request(request_id, [11, 12, 13, 14, 15, 16, 17, 18], greedy)
        outputs = []
        while not outputs:
            outputs = engine.step()
        return outputs

    engine = None
    for index in range(repeats * 2):
        path, segment_weights = weights[index % 2]
        started = time.perf_counter()
        if engine is not None:
            engine.close()
            release_cached_gpu_memory()
        unloaded = time.perf_counter()
        free, total = torch.cuda.mem_get_info(device)
        engine = build_engine(
            json.loads((path / "config.json").read_text()),
            segment_weights,
            device=device,
            dtype="bfloat16",
            engine_config=EngineConfig(),
            memory_budget_bytes=int(free - 0.1 * total),
            eos_token_ids=eos_token_ids(path, {}),
        )
        loaded = time.perf_counter()
        first_token(engine, f"r{index}")
        done = time.perf_counter()
        rows.append(
            {
                "unload_ms": (unloaded - started) * 1e3,
                "load_ms": (loaded - unloaded) * 1e3,
                "first_token_ms": (done - loaded) * 1e3,
                **{k: v * 1e3 for k, v in engine.load_phases.items()},
            }
        )
    report[f"swap phases {shape}"] = rows
    # What the first token's time is made of, on the host.
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profiler:
        started = time.perf_counter()
        first_token(engine, "profiled")
        report["first token under profiler ms"] = (time.perf_counter() - started) * 1e3
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    report["first token ops"] = table.splitlines()
    # The same with the step split by hand.
    engine.add_request("split", [11, 12, 13, 14, 15, 16, 17, 18], greedy)
    sync()
    t0 = time.perf_counter()
    seqs = engine.scheduler.schedule()
    t1 = time.perf_counter()
    inputs = engine.runner.build_inputs(seqs)
    t2 = time.perf_counter()
    logits, _ = engine.runner._forward(inputs)
    t3 = time.perf_counter()
    sync()
    t4 = time.perf_counter()
    from warmserve.layers.sampling import sample

    token = sample(logits, [s.params for s in seqs], [None]).tolist()
    t5 = time.perf_counter()
    engine.scheduler.finish_step(seqs, token)
    engine.sequences.pop("split", None)
    for _, segment_weights in weights:
        segment_weights.close()
    report["first token split ms"] = {
        "schedule": (t1 - t0) * 1e3,
        "build_inputs": (t2 - t1) * 1e3,
        "forward_host": (t3 - t2) * 1e3,
        "forward_gpu_tail": (t4 - t3) * 1e3,
        "sample": (t5 - t4) * 1e3,
    }
    engine.close()
    release_cached_gpu_memory()
    store.close()


def decode_kernels(report, shape, family, batch, context=512):
    from warmserve.config import EngineConfig, SamplingParams
    from warmserve.engine.engine_build import build_engine
    from warmserve.testing.model_configs import checkpoint_config

    config = checkpoint_config(family, shape, "bfloat16", None, None)
    engine = build_engine(
        config,
        None,
        device="cuda",
        dtype="bfloat16",
        max_model_len=context + 64,
        engine_config=EngineConfig(max_num_seqs=batch, max_num_batched_tokens=8192),
    )
    while engine.has_idle_work():  # as the worker does in its idle gaps
        engine.do_idle_work()
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        engine.add_request(f"d{index}", [(index * 7 + j) % 1000 for j in range(context)], params)
    while any(seq.num_output_tokens == 0 for seq in engine.sequences.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    entry = {"graph step ms": statistics.median(times) * 1e3}
    bucket = engine.graph_buckets.replayable(batch)
    graph = engine.runner.decode_graphs.graphs[bucket]
    sync()
    started = time.perf_counter()
    for _ in range(20):
        graph.replay()
    sync()
    entry["graph replay alone ms"] = (time.perf_counter() - started) / 20 * 1e3
    from warmserve.layers.sampling import sample

    parts = defaultdict(float)
    for _ in range(10):
        t0 = time.perf_counter()
        seqs = engine.scheduler.schedule()
        t1 = time.perf_counter()
        inputs = engine.runner.build_inputs(seqs)
        t2 = time.perf_counter()
        logits = engine.runner.decode_graphs.run(inputs, bucket)
        t3 = time.perf_counter()
        tokens = sample(logits, [seq.params for seq in seqs], [None] * len(seqs)).tolist()
        t4 = time.perf_counter()
        engine.scheduler.finish_step(seqs, tokens)
        t5 = time.perf_counter()
        for name, value in (
            ("schedule", t1 - t0),
            ("build_inputs", t2 - t1),
            ("graphs.run (host)", t3 - t2),
            ("gpu wait + sample", t4 - t3),
            ("finish_step", t5 - t4),
        ):
            parts[name] += value * 1e3 / 10
    entry["step parts ms"] = dict(parts)
    seqs = engine.scheduler.schedule()
    inputs = engine.runner.build_inputs(seqs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(5):
            engine.runner._forward(inputs)
        sync()
    kernels = defaultdict(float)
    counts = defaultdict(int)
    for event in profiler.key_averages():
        if event.device_time_total > 0:
            kernels[event.key[:90]] += event.device_time_total / 5 / 1e3
            counts[event.key[:90]] += event.count // 5
    entry["eager kernels ms per step"] = sorted(
        ((round(v, 4), counts[k], k) for k, v in kernels.items()), reverse=True
    )[:25]
    entry["eager kernel total ms"] = sum(kernels.values())
    entry["weights GB"] = engine.weights_bytes / 1e9
    report[f"decode {shape} batch {batch}"] = entry
    engine.close()
    torch.cuda.empty_cache()


def graph_time(fn, calls=20, replays=5) -> float:
    """GPU time of one call of `fn`, from a CUDA graph of `calls` calls (no launch overhead)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    sync()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    sync()
    return (time.perf_counter() - started) / (calls * replays)


def attention_sweep(report, heads=32, kv_heads=8, head_dim=128, block_size=16, context=544):
    """The paged decode kernel's launch settings at the 8B shape, batch 1 and 64: time and the
    KV bytes read per second."""
    from warmserve.layers import triton_attention
    from warmserve.layers.triton_attention import paged_decode

    results = {}
    for batch in (1, 64):
        blocks = -(-context // block_size)
        cache_shape = (batch * blocks + 1, block_size, kv_heads, head_dim)
        k_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda")
        tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks)
        lens = torch.full((batch,), context, dtype=torch.long, device="cuda")
        q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device="cuda")
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        reference = paged_decode(q, k_cache, v_cache, tables, lens, 0.088)
        for tile_blocks in (4, 8):
            for per_sm in (2, 4, 8):
                for warps in (4, 8):
                    for stages in (2, 3):
                        options = dict(
                            tile_blocks=tile_blocks,
                            programs_per_sm=per_sm,
                            num_warps=warps,
                            num_stages=stages,
                        )
                        try:
                            out = paged_decode(q, k_cache, v_cache, tables, lens, 0.088, **options)
                            error = (
                                (out - reference).float().norm() / reference.float().norm()
                            ).item()
                            arguments = (q, k_cache, v_cache, tables, lens, 0.088)
                            seconds = graph_time(
                                lambda a=arguments, o=options: paged_decode(*a, **o)
                            )
                        except Exception as exc:  # a setting the compiler refuses
                            results[f"b{batch} {options}"] = repr(exc)[:80]
                            continue
                        results[f"b{batch} t{tile_blocks} p{per_sm} w{warps} s{stages}"] = (
                            round(seconds * 1e6, 1),
                            round(kv_bytes / seconds / 1e9),
                            round(error, 5),
                        )
    best = {}
    for key, value in results.items():
        if isinstance(value, tuple):
            batch = key.split()[0]
            if batch not in best or value[0] < best[batch][1][0]:
                best[batch] = (key, value)
    report["attention sweep (us, GB/s, rel err)"] = results
    report["attention best"] = best
    default = (
        f" t{triton_attention.TILE_BLOCKS} p{triton_attention.PROGRAMS_PER_SM}"
        f" w{triton_attention.NUM_WARPS} s{triton_attention.NUM_STAGES}"
    )
    report["attention default"] = {key: value for key, value in results.items() if default in key}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile-out")
    parser.add_argument("--parts", nargs="*", default=["env", "copy", "swap", "decode"])
    parser.add_argument("--checkpoints", default="/tmp/ck")
    args = parser.parse_args()
    report: dict = {"device": torch.cuda.get_device_name()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))

    steps = {
        "env": lambda: environment(report),
        "copy": lambda: copy_bandwidth(report),
        "swap": lambda: swap_phases(report, Path(args.checkpoints)),
        "attention": lambda: attention_sweep(report),
        "decode": lambda: [
            decode_kernels(report, "qwen3-0.6b", "qwen3", 1),
            decode_kernels(report, "llama-3.1-8b", "llama", 1),
            decode_kernels(report, "llama-3.1-8b", "llama", 64),
        ],
    }
    for part in args.parts:
        started = time.perf_counter()
        try:
            steps[part]()
        except Exception as exc:  # keep what the other parts found
            import traceback

            traceback.print_exc()
            report[f"{part} failed"] = repr(exc)
        print(f"{part}: {time.perf_counter() - started:.1f} s", flush=True)
        save()
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

"""The engine alone (no server, no worker process) under the load of `bench serve`'s closed loop:
64 clients, 512 prompt tokens, 128 output tokens, greedy, each client sending its next request
when one ends (they join two a step, as over HTTP, not in one wave). Run on a GPU, not in CI.

1. For asynchronous and synchronous scheduling: output tokens per second; every step's time
   (CUDA events, launched_step.StepClock) by kind and by the prompt tokens it carried; and the
   engine-level inter-token gap of each stream (host time between two of its tokens leaving
   `Engine.step`): what the engine adds to the ITL that `bench serve` measures over HTTP.
2. `--step-kernels`: the kernels of single synchronous steps, by name (torch.profiler): a decode
   step of 63 streams at ~600 tokens, then one that also runs a prompt of 256 tokens.

    python scripts/engine_closed_loop.py [--shape qwen3-0.6b] [--step-kernels] [--out DIR]

On a CPU (a check that the script runs) the tiny shape takes shorter requests.
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gpu_check import save_report  # scripts/, beside this file

from warmserve.bench.checkpoints import bench_checkpoint
from warmserve.bench.http_load import distribution_ms
from warmserve.bench.workloads import random_prompt
from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine import engine as engine_module
from warmserve.engine.engine_build import engine_from_checkpoint

ON_GPU = torch.cuda.is_available()
PROMPT, OUTPUT, CLIENTS = (512, 128, 64) if ON_GPU else (48, 16, 64)
rng = random.Random(0)


class StepLog:
    """Every resolved step's kind, prompt tokens, decodes and event-timed seconds."""

    def __init__(self):
        self.steps: list[tuple[str, int, int, float]] = []
        launch, resolve = engine_module.Engine._launch, engine_module.Engine._resolve

        def launched(engine, seqs):
            step = launch(engine, seqs)
            step.kind = engine.runner.last_step_kind
            return step

        def resolved(engine, step):
            outputs = resolve(engine, step)
            if step.clock is not None:
                self.steps.append(
                    (step.kind, step.prompt_tokens, step.decodes, step.clock.seconds())
                )
            return outputs

        engine_module.Engine._launch, engine_module.Engine._resolve = launched, resolved

    def by_kind(self) -> dict[str, dict]:
        groups = collections.defaultdict(list)
        for kind, prompt_tokens, decodes, seconds in self.steps:
            bucket = 0 if prompt_tokens == 0 else -(-prompt_tokens // 256) * 256
            groups[f"{kind}, prompt tokens <= {bucket}"].append((seconds, decodes))
        return {
            key: {
                "steps": len(entries),
                "mean_ms": 1e3 * sum(s for s, _ in entries) / len(entries),
                "mean_decodes": sum(d for _, d in entries) / len(entries),
            }
            for key, entries in sorted(groups.items())
        }


def gap_distribution_ms(gaps: list[float]) -> dict[str, float]:
    """As `bench serve` reports its ITL, with the p90 and the longest gap beside."""
    values = np.asarray(gaps) * 1e3
    return {
        **distribution_ms(gaps),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def build(checkpoint: Path, **flags):
    engine = engine_from_checkpoint(
        checkpoint,
        device="cuda" if ON_GPU else "cpu",
        engine_config=EngineConfig(**flags),
        memory_budget_bytes=40 << 30,
    )
    while engine.has_idle_work():  # kernels compiled, graphs captured: as a warm server
        engine.do_idle_work()
    return engine


def closed_loop(engine, requests: int, log: StepLog) -> dict:
    params = SamplingParams(max_tokens=OUTPUT, ignore_eos=True, temperature=0)
    sent = done = tokens = 0
    joining = CLIENTS
    gaps: list[float] = []
    last_token: dict[str, float] = {}
    log.steps.clear()

    def send():
        nonlocal sent
        engine.add_request(f"r{sent}", random_prompt(rng, PROMPT), params)
        sent += 1

    started = time.perf_counter()
    while done < requests:
        for _ in range(min(2, joining)):
            send()
            joining -= 1
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.request_id in last_token:
                gaps.append(now - last_token[output.request_id])
            last_token[output.request_id] = now
            tokens += 1
            if output.finish_reason is not None:
                done += 1
                if sent < requests + CLIENTS:
                    send()
    seconds = time.perf_counter() - started
    for request_id in list(engine.sequences):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "output_tokens_per_s": tokens / seconds,
        "steps": len(log.steps),
        "step_ms_by_kind": log.by_kind(),
        "engine_itl_ms": gap_distribution_ms(gaps),
        "prompt_budget": engine.scheduler.prompt_budget,
    }


def step_kernels(checkpoint: Path) -> dict:
    engine = build(
        checkpoint,
        async_scheduling=False,
        prefill_tokens_beside_decodes=PROMPT,
        prompt_step_time_ratio=0,
    )
    params = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)
    for i in range(CLIENTS - 1):
        engine.add_request(f"d{i}", random_prompt(rng, PROMPT + 48), params)
    for _ in range(80):
        engine.step()

    def profiled(label: str) -> dict:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if ON_GPU:
            torch.cuda.synchronize()
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            engine.step()
            if ON_GPU:
                torch.cuda.synchronize()
        kernels = collections.Counter()
        for event in profile.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.name[:70]] += event.self_device_time_total / 1e3
        return {
            "step": label,
            "kind": engine.last_step_kind,
            "kernel_ms": sum(kernels.values()),
            "top_kernels_ms": dict(kernels.most_common(12)),
        }

    decode = profiled("63 decodes")
    engine.add_request("prompt", random_prompt(rng, 256), params)
    return {"decode": decode, "with prompt": profiled("63 decodes + a 256-token prompt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b" if ON_GPU else "tiny")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--step-kernels", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    dtype = "bfloat16" if ON_GPU else "float32"
    checkpoint = bench_checkpoint(root, args.shape, dtype)
    log = StepLog()
    report: dict = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu"}
    for label, flags in (
        ("async", {"async_scheduling": True}),
        ("sync", {"async_scheduling": False}),
    ):
        if not ON_GPU and label == "async":
            continue  # a CPU launch computes the step: nothing would overlap
        engine = build(checkpoint, **flags)
        closed_loop(engine, CLIENTS, log)  # a first round: the cache mapped, the budget set
        report[label] = closed_loop(engine, args.requests, log)
        engine.close()
    if args.step_kernels:
        report["step kernels"] = step_kernels(checkpoint)
    print(save_report(report, args.out, "engine_closed_loop.json"))


if __name__ == "__main__":
    main()

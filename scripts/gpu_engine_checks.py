"""GPU correctness checks of whole engines (run on a GPU machine by scripts/gpu_check.py, not in
CI): float32 greedy output against transformers, with every graph captured; a load from the host
store; graphs captured in idle gaps; the graphs of decode and prompt steps and asynchronous
scheduling against eager synchronous steps."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine import Engine
from warmserve.engine.engine_build import build_engine, engine_from_checkpoint
from warmserve.loader.checkpoint import Checkpoint
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.loader.weight_store import HostWeightStore
from warmserve.testing.checkpoints import build_checkpoint


def check_greedy_against_transformers(report: dict, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [[5, 9, 200, 31], list(range(40, 140)), [7], list(range(300, 317))]
    for family in ("qwen3", "llama", "opt"):
        path = build_checkpoint(
            root / family,
            family,
            {"hidden_size": 256, "num_hidden_layers": 4} if family != "qwen3" else "tiny",
        )
        engine = engine_from_checkpoint(
            path, device="cuda", dtype="float32", engine_config=EngineConfig(max_num_seqs=8)
        )
        while engine.has_idle_work():  # as a worker's idle gaps would before traffic
            engine.do_idle_work()
        greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        outputs = _greedy_outputs(engine, prompts, greedy)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        reference.generation_config.eos_token_id = None  # as ignore_eos: EOS ids stay choosable
        equal = 0
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device="cuda")
            expected = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
            )[0, len(prompt) :].tolist()
            equal += expected == outputs[str(index)]
        report[f"greedy float32 {family} (prompts equal to transformers)"] = (
            f"{equal}/{len(prompts)}"
        )
        report[f"graphs captured {family}"] = engine.graph_buckets.captured
        report[f"prompt-step graphs captured {family}"] = (
            engine.runner.mixed_graphs.buckets.captured
        )
        engine.close()
        report[f"host-store load (stacked views of one arena) equal {family}"] = (
            _greedy_from_host_store(path, prompts, greedy) == outputs
        )


def check_graphs_in_idle_gaps(report: dict, root: Path) -> None:
    """A model loaded by a worker has no decode graph; it decodes eagerly until the worker's idle
    gaps capture its buckets, one per gap, smallest first; then its greedy output (decode batches
    of 1 to 5, padded up to their buckets) is the same as eagerly. Also what capture costs."""
    from warmserve.engine.kv_pool import KVPool
    from warmserve.protocol import LoadModel
    from warmserve.worker.residents import ResidentModels

    path = build_checkpoint(root / "graphs", "qwen3", "tiny")
    models = ResidentModels(0, torch.device("cuda"), lambda event: None)
    command = LoadModel(
        1, "m", "m", str(path), None, "float32", None, EngineConfig(max_num_seqs=8), 0, 1, None
    )
    budget = torch.cuda.mem_get_info()[0] // 2
    pool = KVPool.for_device(torch.device("cuda"), budget)
    engine = models.load(command, budget, {}, pool).engine
    report["idle gaps: graphs captured by the load"] = list(engine.graph_buckets.captured)
    prompts = [[5, 9, 200, 31], list(range(40, 140)), [7], list(range(300, 317)), [3, 4]]

    def greedy_run() -> list[list[int]]:
        for index, prompt in enumerate(prompts):  # 6 to 14 tokens: batches shrink as they end
            params = SamplingParams(max_tokens=6 + 2 * index, temperature=0.0, ignore_eos=True)
            engine.add_request(str(index), prompt, params)
        outputs = {str(i): [] for i in range(len(prompts))}
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[output.request_id].append(output.token_id)
        return list(outputs.values())

    eager = greedy_run()
    report["idle gaps: graphs captured after eager traffic"] = list(engine.graph_buckets.captured)
    capture_ms = []
    while True:
        started = time.perf_counter()
        if not models.work_in_idle_gap():
            break
        torch.cuda.synchronize()
        capture_ms.append(round((time.perf_counter() - started) * 1e3, 1))
    report["idle gaps: buckets captured, in order"] = list(engine.graph_buckets.captured)
    report["idle gaps: ms per capture (qwen3 tiny)"] = capture_ms
    report["idle gaps: greedy with graphs equals eager"] = greedy_run() == eager
    models.drop_all()


def check_async_scheduling(report: dict, root: Path) -> None:
    """Asynchronous scheduling (decode inputs gathered on the device from the step before, tokens
    resolved a step late) and the graphs of decode and prompt steps, each against synchronous
    eager steps, with prompts that finish at different steps and arrive while others decode."""
    path = build_checkpoint(root / "async", "llama", {"hidden_size": 256, "num_hidden_layers": 4})
    prompts = [[5, 9, 200, 31], list(range(40, 140)), [7], list(range(300, 317)), [3, 4]]
    outputs, kinds = {}, {}
    for async_scheduling, graphs in itertools.product((False, True), (False, True)):
        config = EngineConfig(max_num_seqs=8, async_scheduling=async_scheduling)
        engine = engine_from_checkpoint(path, device="cuda", dtype="float32", engine_config=config)
        while graphs and engine.has_idle_work():
            engine.do_idle_work()
        finished: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        for index, prompt in enumerate(prompts[:3]):
            params = SamplingParams(max_tokens=6 + 5 * index, temperature=0.0, ignore_eos=True)
            engine.add_request(str(index), prompt, params)
        steps, ran = 0, set()
        while engine.has_unfinished_requests():
            for output in engine.step():
                finished[output.request_id].append(output.token_id)
            ran.add(engine.runner.last_step_kind)
            steps += 1
            if steps == 3:  # late arrivals: a prefill among in-flight decodes
                for index in (3, 4):
                    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
                    engine.add_request(str(index), prompts[index], params)
        engine.close()
        outputs[(async_scheduling, graphs)] = finished
        kinds[(async_scheduling, graphs)] = sorted(ran)
    eager = outputs[(False, False)]
    report["graphs (decode and prompt steps) greedy equals eager"] = outputs[(False, True)] == eager
    report["step kinds with graphs"] = kinds[(False, True)]
    for graphs in (False, True):
        label = "graphs" if graphs else "eager"
        report[f"async scheduling greedy equals synchronous eager ({label})"] = (
            outputs[(True, graphs)] == eager
        )


def _greedy_outputs(engine: Engine, prompts, greedy) -> dict[str, list[int]]:
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, greedy)
    outputs = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output.token_id)
    return outputs


def _greedy_from_host_store(path: Path, prompts, greedy) -> dict[str, list[int]]:
    """The same greedy run with the weights bound as views of one copy of a registered host-store
    segment (a reload's path), for comparison with the checkpoint load's."""
    store = HostWeightStore(8 * 2**30, f"gpucheck{os.getpid()}")
    weights = SegmentWeights(store.store_checkpoint(str(path), Checkpoint(path)))
    weights.register_for_dma()
    engine = build_engine(
        json.loads((path / "config.json").read_text()),
        weights,
        device="cuda",
        dtype="float32",
        engine_config=EngineConfig(max_num_seqs=8),
    )
    assert engine.skeleton_key is not None, "the arena path was not taken"
    outputs = _greedy_outputs(engine, prompts, greedy)
    engine.close()
    torch.cuda.synchronize()
    weights.close()
    store.close()
    return outputs

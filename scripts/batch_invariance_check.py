"""Batch-invariant mode on a GPU (run on a GPU machine, not in CI; torch, triton):

1. the fixed-tile matmul: each row of a batch's product is bitwise the row computed alone, for
   batches of 1 to 4,096 rows; its error against a float64 product beside cuBLAS's; its time
   beside cuBLAS's;
2. a bf16 random-weight model (grouped-query attention, graphs captured): greedy requests sent
   one at a time, then the same requests arriving among 56 others (so that their prompts are
   chunked beside decodes and their decodes share steps of every size): equal token for token
   with --batch-invariant; the same run in the default mode as the control that shows the
   comparison can fail;
3. a 64-sequence decode step's time in either mode.

    python scripts/batch_invariance_check.py [--out DIR]

Prints one JSON object; "ok" is true when every invariance check passed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_check import relative_error, save_report  # scripts/, beside this file

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.layers.triton_matmul import invariant_linear
from warmserve.testing.checkpoints import build_checkpoint

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def check_matmul(report: dict) -> bool:
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(6144, 4096, device="cuda", generator=generator, dtype=torch.bfloat16)
    x = torch.randn(4096, 4096, device="cuda", generator=generator, dtype=torch.bfloat16)
    full = invariant_linear(x, weight)
    invariant = True
    for rows in (1, 7, 64, 200, 1000):
        invariant &= torch.equal(invariant_linear(x[:rows], weight), full[:rows])
        invariant &= torch.equal(
            invariant_linear(x[rows : rows + 3], weight), full[rows : rows + 3]
        )
    cublas = F.linear(x[:64], weight)
    invariant_cublas = torch.equal(F.linear(x[:1], weight), cublas[:1])
    exact = F.linear(x[:64].double(), weight.double())
    report["matmul rows equal alone and in batches of 1..4096"] = invariant
    report["cuBLAS row 0 equal alone and in a batch of 64 (informational)"] = invariant_cublas
    report["matmul relative error vs float64: invariant, cuBLAS"] = [
        relative_error(invariant_linear(x[:64], weight), exact),
        relative_error(cublas, exact),
    ]
    for rows in (64, 4096):
        report[f"matmul ms at {rows}x4096x6144: invariant, cuBLAS"] = [
            _time_ms(lambda rows=rows: invariant_linear(x[:rows], weight)),
            _time_ms(lambda rows=rows: F.linear(x[:rows], weight)),
        ]
    return invariant


def check_engine(report: dict, root: Path) -> bool:
    path = build_checkpoint(root / "llama", "llama", SHAPE)
    rng = random.Random(0)
    targets = [[rng.randrange(5, 900) for _ in range(length)] for length in (3, 40, 130, 700)]
    targets += [[rng.randrange(5, 900) for _ in range(length)] for length in (17, 260, 9, 513)]
    others = [[rng.randrange(5, 900) for _ in range(rng.randrange(4, 800))] for _ in range(56)]
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    ok = True
    for invariant in (True, False):
        config = EngineConfig(max_num_seqs=64, batch_invariant=invariant)
        engine = engine_from_checkpoint(path, device="cuda", dtype="bfloat16", engine_config=config)
        while engine.has_idle_work():  # every graph captured, as a worker's idle gaps would
            engine.do_idle_work()
        kinds: set[str] = set()
        alone = [_run(engine, {"t": prompt}, {}, greedy, kinds)["t"] for prompt in targets]
        # The others start first; the targets arrive while they decode (prompts chunked beside
        # decodes, decode steps of every size).
        late = {f"t{i}": prompt for i, prompt in enumerate(targets)}
        crowded = _run(engine, {f"o{i}": p for i, p in enumerate(others)}, late, greedy, kinds)
        equal = sum(crowded[f"t{i}"] == tokens for i, tokens in enumerate(alone))
        label = "batch-invariant" if invariant else "default (control)"
        report[f"greedy bf16 alone == among 56 others, {label}"] = f"{equal}/{len(targets)}"
        report[f"step kinds, {label}"] = sorted(kinds)
        report[f"decode step ms at 64 sequences, {label}"] = _decode_step_ms(engine, others)
        engine.close()
        if invariant:
            ok = equal == len(targets)
    return ok


def _run(engine, first: dict, late: dict, greedy, kinds: set[str]) -> dict[str, list[int]]:
    for request_id, prompt in first.items():
        engine.add_request(request_id, prompt, greedy)
    outputs = {request_id: [] for request_id in (*first, *late)}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output.token_id)
        kinds.add(engine.runner.last_step_kind)
        steps += 1
        if steps == 4:
            for request_id, prompt in late.items():
                engine.add_request(request_id, prompt, greedy)
    return outputs


def _decode_step_ms(engine, prompts) -> float:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts[:64]):
        engine.add_request(f"d{index}", prompt[:64], params)
    while any(seq.num_output_tokens == 0 for seq in engine.sequences.values()):
        engine.step()
    times = []
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times[2:-2]) * 1e3, 3)


def _time_ms(launch) -> float:
    launch()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        launch()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) / 20 * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report: dict = {"device": torch.cuda.get_device_name()}
    matmul_ok = check_matmul(report)
    with tempfile.TemporaryDirectory() as root:
        engine_ok = check_engine(report, Path(root))
    report["ok"] = matmul_ok and engine_ok
    print(save_report(report, args.out, "batch_invariance_check.json"))


if __name__ == "__main__":
    main()

"""CPU throughput of the engine next to transformers' generate, on the same random checkpoint.

    python -m warmserve.bench.cpu_engine [--batch-sizes 1 16] [--new-tokens 64] [--threads N]

Builds a small llama-family checkpoint (float32), then for each batch size generates greedily
from the same prompts with the engine (all requests submitted together, stepped to completion)
and with transformers (one generate call on the batch) and prints generated tokens per second,
prefill included, best of `--repeats` runs. Prompts all have the same length, so transformers
needs no padding and both do the same work. Needs transformers (a dev dependency).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine import Engine
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.testing.checkpoints import build_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    return parser.parse_args()


def model_shape(args: argparse.Namespace) -> dict:
    return {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden_size // 64,
        "num_key_value_heads": max(1, args.hidden_size // 128),
        "intermediate_size": 4 * args.hidden_size,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": 1024,
    }


def engine_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
        outputs[str(index)] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output.token_id)
    return [outputs[str(index)] for index in range(len(prompts))]


def transformers_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    input_ids = torch.tensor(prompts)
    with torch.inference_mode():
        result = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return result[:, input_ids.shape[1] :].tolist()


def best_time(run, repeats: int) -> tuple[float, list[list[int]]]:
    run()  # warm-up: first-call allocations and lazy initialisation
    best, outputs = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = run()
        best = min(best, time.perf_counter() - started)
    return best, outputs


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        path = build_checkpoint(Path(scratch) / "model", "llama", model_shape(args))
        engine = engine_from_checkpoint(
            path,
            dtype="float32",
            max_model_len=args.prompt_tokens + args.new_tokens,
            engine_config=EngineConfig(max_num_seqs=max(args.batch_sizes)),
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # No EOS: both sides generate exactly --new-tokens tokens.
    model.generation_config.eos_token_id = None

    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"llama, hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}, "
        f"{parameters / 1e6:.1f}M parameters, float32, {torch.get_num_threads()} threads; "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy"
    )
    print(f"{'batch':>5}  {'engine tok/s':>12}  {'transformers tok/s':>18}  {'ratio':>6}  same")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        prompts = torch.randint(
            3, args.vocab_size, (batch, args.prompt_tokens), generator=generator
        ).tolist()
        engine_seconds, engine_tokens = best_time(
            lambda prompts=prompts: engine_generate(engine, prompts, args.new_tokens),
            args.repeats,
        )
        hf_seconds, hf_tokens = best_time(
            lambda prompts=prompts: transformers_generate(model, prompts, args.new_tokens),
            args.repeats,
        )
        generated = batch * args.new_tokens
        engine_rate, hf_rate = generated / engine_seconds, generated / hf_seconds
        same = sum(a == b for a, b in zip(engine_tokens, hf_tokens, strict=True))
        print(
            f"{batch:>5}  {engine_rate:>12.1f}  {hf_rate:>18.1f}  {engine_rate / hf_rate:>6.2f}  "
            f"{same}/{batch}"
        )


if __name__ == "__main__":
    main()

"""What a `warmserve bench serve` run consists of: its presets, the engine flags it hands to
the server and the baselines, and the seeded requests of each scenario it sends."""

from __future__ import annotations

import argparse
import math
import random

from warmserve.bench import http_load
from warmserve.bench.workloads import fixed_lengths, random_prompt, sharegpt_like_lengths

MODEL_NAME = "bench"
MIXES = ("fixed", "sharegpt")
# A schema no output of the benchmark's length can complete (a string of at least 100,000
# characters): every constrained request runs its full length, as the unconstrained ones do.
LONG_TEXT_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "bench",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 100000}},
            "required": ["text"],
        },
    },
}
FULL = {
    "shape": "llama-3.1-8b",
    "concurrency": [1, 16, 64, 128],
    "rates": [1.0, 4.0, 16.0],
    "mixes": list(MIXES),
    "input_len": 512,
    "output_len": 128,
    "min_requests": 16,
    "duration_s": 20.0,
    "decode_steps": 32,
    "length_scale": 1.0,
}
QUICK = {  # tiny model, small sweep: CI runs this in seconds on CPU
    **FULL,
    "shape": "tiny",
    "concurrency": [1, 4],
    "rates": [8.0],
    "input_len": 32,
    "output_len": 16,
    "min_requests": 4,
    "duration_s": 1.0,
    "decode_steps": 8,
    "length_scale": 0.1,
    "max_model_len": 256,
}


# `warmserve serve` flags of the engine that the Python API and engine baselines take too
# (`--flag` or `--no-flag`; neither: the server's default).
ENGINE_FLAGS = ("--async-scheduling", "--batch-invariant")


def _attribute(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def engine_flags(args: argparse.Namespace) -> dict[str, bool]:
    """The EngineConfig fields that the run's engine flags set."""
    given = {_attribute(flag): getattr(args, _attribute(flag)) for flag in ENGINE_FLAGS}
    return {name: value for name, value in given.items() if value is not None}


def engine_serve_args(args: argparse.Namespace) -> list[str]:
    return [
        flag if getattr(args, _attribute(flag)) else "--no-" + flag.removeprefix("--")
        for flag in ENGINE_FLAGS
        if getattr(args, _attribute(flag)) is not None
    ]


def build_scenarios(args: argparse.Namespace, context_len: int) -> list[dict]:
    """Every run of the sweep, each with its own seeded requests."""
    scenarios = []
    for mix in args.mixes:
        for clients in args.concurrency:
            count = max(args.min_requests, 4 * clients)
            scenarios.append({"kind": "concurrency", "value": clients, "mix": mix, "n": count})
        for rate in args.rates:
            count = max(4, math.ceil(rate * args.duration_s))
            scenarios.append({"kind": "rate", "value": rate, "mix": mix, "n": count})
    if args.json_schema:
        scenarios += [
            {**scenario, "structured": True}
            for scenario in scenarios
            if scenario["mix"] == "fixed" and scenario["kind"] == "concurrency"
        ]
    for index, scenario in enumerate(scenarios):
        scenario["name"] = f"{scenario['mix']} {scenario['kind']} {scenario['value']:g}"
        if scenario.get("structured"):
            scenario["name"] += " json_schema"
        seed = scenario["seed"] = args.seed * 1000 + index  # lengths, prompts and arrivals
        if scenario["mix"] == "fixed":
            lengths = fixed_lengths(scenario["n"], args.input_len, args.output_len)
        else:
            lengths = sharegpt_like_lengths(scenario["n"], seed, context_len, args.length_scale)
        rng = random.Random(seed)
        response_format = LONG_TEXT_FORMAT if scenario.get("structured") else None
        scenario["requests"] = [
            http_load.BenchRequest(
                MODEL_NAME, random_prompt(rng, input_len), output_len, response_format
            )
            for input_len, output_len in lengths
        ]
    return scenarios

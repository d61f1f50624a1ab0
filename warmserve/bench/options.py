"""Command-line options of the benchmarks: the swap benchmark's, and those that `bench serve`
and `bench trace` share, with their presets. Nothing here imports torch: every `warmserve`
command, `serve` among them, builds the parser that holds these options.

A preset option defaults to None on the command line; `apply_presets` fills what the run did
not name from the quick preset (`--quick`) or the full one, so `--quick --clients 4` keeps 4.
"""

from __future__ import annotations

import argparse

from warmserve.config import DTYPE_ITEMSIZE

# The swap benchmark's shapes: name -> family.
SWAP_SHAPES = {"opt-125m": "opt", "qwen3-0.6b": "qwen3", "llama-3.1-8b": "llama"}
SWAP_QUICK_SHAPES = {"tiny": "qwen3", "tiny-opt": "opt"}


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--shapes", nargs="*", help=f"subset of {sorted(SWAP_SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoints", default=".checkpoints/bench")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json")
    parser.add_argument("--markdown", default="BENCHMARKS.md")


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_ITEMSIZE),
        help="of the built checkpoints (default: bfloat16 on a GPU); with `bench serve "
        "--model-path`, the dtype its model is loaded in (default: the checkpoint's)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to `warmserve serve` (repeat; write flags as --serve-arg=--flag)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", default=".checkpoints/bench", help="built models")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON and logs")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="section updated in place")


def apply_presets(args: argparse.Namespace, full: dict, quick: dict) -> None:
    preset = quick if args.quick else full
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_name(device: str) -> str:
    """The GPU's name. Asking creates a CUDA context in this process (hundreds of MB of GPU
    memory), so a benchmark asks once its server has stopped."""
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def quick_serve_args(args: argparse.Namespace) -> list[str]:
    """One CPU worker is all the tiny models of a quick run need (and the most a shared CI
    machine should start); the run's own --serve-arg flags come after, so they win."""
    return ["--workers", "1"] if args.quick else []

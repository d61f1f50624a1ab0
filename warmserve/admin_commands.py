"""The client commands: `warmserve load`, `unload` and `ps`, talking to a running server over
HTTP (they import nothing of the server side, so they start in a fraction of a second)."""

from __future__ import annotations

import argparse
import sys
import time

from warmserve.client import AdminClient
from warmserve.text_tables import format_bytes, format_table


def run_load(args: argparse.Namespace) -> int:
    from warmserve.load_progress import load_with_progress

    # Two clients: the load's request blocks in a thread while the other polls its progress.
    with AdminClient(args.url, args.api_key) as client, AdminClient(args.url, args.api_key) as poll:
        result = load_with_progress(
            args.name,
            lambda: client.load(
                args.name,
                args.path,
                tensor_parallel_size=args.tp,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                port=args.port,
            ),
            poll.load_progress,
            sys.stderr,
        )
    workers = ", ".join(str(worker) for worker in result["workers"])
    line = (
        f"loaded {result['name']} on worker(s) {workers} in {result['load_seconds']:.3f} s "
        f"(from {result['source']})"
    )
    if result.get("port"):
        line += f"; also serving it on port {result['port']}"
    print(line)
    return 0


def run_unload(args: argparse.Namespace) -> int:
    with AdminClient(args.url, args.api_key) as client:
        result = client.unload(args.name)
    print(f"unloaded {result['name']} in {result['unload_seconds']:.3f} s")
    return 0


def run_ps(args: argparse.Namespace) -> int:
    with AdminClient(args.url, args.api_key) as client:
        models, workers = client.models(), client.workers()
    now = time.time()
    if models:
        print(
            format_table(
                [
                    "MODEL",
                    "STATE",
                    "WORKERS",
                    "TP",
                    "DTYPE",
                    "SOURCE",
                    "LOAD S",
                    "LAST USED",
                    "IN FLIGHT",
                    "QUEUED",
                    "MEMORY",
                    "KEEP ALIVE",
                    "PINNED",
                    "PORT",
                ],
                [
                    [
                        model["name"],
                        model["state"],
                        ",".join(str(worker) for worker in model["workers"]) or "-",
                        model["tensor_parallel_size"],
                        model["dtype"],
                        model["load_source"] or "-",
                        _seconds(model["load_seconds"]),
                        _ago(model["last_used"], now),
                        model["requests_in_flight"],
                        model["requests_queued"],
                        format_bytes(model["memory_bytes"]) if model["memory_bytes"] else "-",
                        _keep_alive(model["keep_alive"]),
                        "yes" if model["pinned"] else "no",
                        model["port"] or "-",
                    ]
                    for model in models
                ],
            )
        )
        for model in models:
            if model.get("error"):
                print(f"{model['name']} failed: {model['error']}")
    else:
        print("no models")
    print()
    print(
        format_table(
            [
                "WORKER",
                "PID",
                "NODE",
                "DEVICE",
                "STATE",
                "MODELS",
                "USED",
                "FREE",
                "USABLE",
                "TOTAL",
            ],
            [
                [
                    worker["id"],
                    worker["pid"] or "-",
                    _short_node(worker["node"]),
                    worker["device"],
                    worker["state"],
                    _resident_models(worker["models"]),
                    format_bytes(worker["memory_used_bytes"]),
                    format_bytes(worker["memory_free_bytes"]),
                    format_bytes(worker["memory_usable_bytes"]),
                    format_bytes(worker["memory_total_bytes"]),
                ]
                for worker in workers
            ],
        )
    )
    return 0


def _short_node(node: str) -> str:
    """A Ray node id is 56 hex digits; its first 12 tell the nodes of a cluster apart."""
    return node[:12]


def _resident_models(models: list[dict]) -> str:
    """The models sharing a worker, each with what it takes there."""
    if not models:
        return "-"
    return ", ".join(f"{m['name']} ({format_bytes(m['memory_bytes'])})" for m in models)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ago(unix_time: float | None, now: float) -> str:
    if unix_time is None:
        return "-"
    seconds = max(0, round(now - unix_time))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _keep_alive(seconds: float) -> str:
    if seconds < 0:
        return "forever"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"

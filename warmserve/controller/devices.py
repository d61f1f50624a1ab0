"""Which devices the workers take, found without importing torch (the server never does): the
GPUs the driver lists, narrowed by CUDA_VISIBLE_DEVICES; and what each worker is started with."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from warmserve.config import CPU_WORKER_MEMORY_GB, GIB, ServerConfig
from warmserve.controller.launchers.base import WorkerSlot
from warmserve.controller.launchers.local import LOCAL_NODE
from warmserve.controller.pool import StartupError
from warmserve.protocol import WorkerArgs

CPU_WORKERS = 2


def visible_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([entry for entry in visible.split(",") if entry.strip() not in ("", "-1")])
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
            )
            if listing.returncode == 0:
                return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0


def local_slots(device: str, workers: int | None) -> list[WorkerSlot]:
    """This host's workers: CPU workers share its cores."""
    devices = worker_devices(device, workers)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else None
    return [WorkerSlot(device, LOCAL_NODE, threads) for device in devices]


def worker_devices(device: str, workers: int | None) -> list[str]:
    if device == "auto":
        device = "cuda" if visible_gpu_count() > 0 else "cpu"
    if device == "cuda":
        count = visible_gpu_count()
        if count == 0:
            raise StartupError("--device cuda, but no GPU is visible; use --device cpu")
        wanted = workers or count
        if wanted > count:
            raise StartupError(f"--workers {wanted}, but only {count} GPU(s) are visible")
        return [f"cuda:{i}" for i in range(wanted)]
    if device != "cpu":
        raise StartupError(f"--device must be auto, cuda or cpu, not {device!r}")
    return ["cpu"] * (workers or CPU_WORKERS)


def worker_args_factory(
    config: ServerConfig,
) -> Callable[[int, WorkerSlot, str, str, str], WorkerArgs]:
    """Builds each worker's start-up arguments from the server's configuration."""
    memory_gb = config.worker_memory_gb

    def worker_args(worker_id, slot, command_address, event_address, peer_address) -> WorkerArgs:
        cap_gb = memory_gb
        if cap_gb is None and slot.device == "cpu":
            cap_gb = CPU_WORKER_MEMORY_GB
        return WorkerArgs(
            worker_id=worker_id,
            device=slot.device,
            command_address=command_address,
            event_address=event_address,
            memory_cap_bytes=int(cap_gb * GIB) if cap_gb is not None else None,
            gpu_memory_utilization=config.gpu_memory_utilization,
            memory_release_delay_s=config.memory_release_delay_s,
            num_threads=slot.num_threads,
            parent_pid=os.getpid(),
            peer_address=peer_address,
        )

    return worker_args

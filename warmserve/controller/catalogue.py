"""The checkpoints the controller knows: paths resolved against the model root, each folder's
index and tokenizer read once per version, and what a model will take on a worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

from warmserve.config import DTYPE_ITEMSIZE, EngineConfig
from warmserve.controller.errors import CheckpointInvalid, InvalidRequest, PathForbidden
from warmserve.controller.tokenizer import ModelTokenizer
from warmserve.loader.checkpoint import Checkpoint, CheckpointError, read_model_config
from warmserve.models.config import ModelConfig, UnsupportedArchitecture, architecture_of
from warmserve.models.memory_plan import estimate_footprint


class CheckpointCatalogue:
    def __init__(self, model_root: str | None):
        self.model_root = model_root
        self._opened: dict[Path, tuple[tuple, tuple[Checkpoint, ModelTokenizer]]] = {}

    def resolve(self, path: str) -> Path:
        root = self.model_root
        try:
            candidate = Path(path).expanduser()
            if root is None:
                return candidate.resolve()
            root_path = Path(root).expanduser().resolve()
            resolved = (candidate if candidate.is_absolute() else root_path / candidate).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop, ...
            raise InvalidRequest(f"path {path!r} is not usable: {exc}") from None
        if not resolved.is_relative_to(root_path):
            raise PathForbidden(f"{path!r} lies outside the model root")
        return resolved

    async def open(self, path: Path) -> tuple[Checkpoint, ModelTokenizer]:
        """The checkpoint's index and tokenizer, read once per folder version: a reload (a swap)
        skips parsing headers and tokenizer.json (a real tokenizer takes ~100 ms)."""
        version = _folder_version(path)
        cached = self._opened.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        opened = await asyncio.to_thread(_open_checkpoint, path)
        self._opened[path] = (version, opened)
        return opened


def footprint_per_worker(
    checkpoint: Checkpoint,
    engine_config: EngineConfig,
    dtype: str,
    tp: int,
    max_model_len: int | None,
) -> int:
    """What the model will take on each of its `tp` workers (weights, KV cache, activations)."""
    source_itemsize = next(iter(checkpoint.tensors.values())).itemsize
    config = ModelConfig.from_dict(checkpoint.config)
    if dtype == "auto":
        itemsize = DTYPE_ITEMSIZE.get(str(config.torch_dtype), source_itemsize)
        weights = checkpoint.nbytes
    else:
        itemsize = DTYPE_ITEMSIZE[dtype]
        weights = checkpoint.nbytes * itemsize // source_itemsize
    return estimate_footprint(
        config,
        engine_config,
        weights_bytes=weights // tp,
        itemsize=itemsize,
        max_model_len=max_model_len,
        tensor_parallel_size=tp,
    )


def _open_checkpoint(path: Path) -> tuple[Checkpoint, ModelTokenizer]:
    try:
        _, config = read_model_config(path)
        architecture_of(config)
        ModelConfig.from_dict(config)
        return Checkpoint(path), ModelTokenizer(path)
    except CheckpointError as exc:
        raise CheckpointInvalid(str(exc)) from None
    except UnsupportedArchitecture as exc:
        raise CheckpointInvalid(f"{path / 'config.json'}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointInvalid(f"{path / 'config.json'}: invalid config ({exc})") from None
    except OSError as exc:  # a name too long, a directory that cannot be read, ...
        raise CheckpointInvalid(f"{path}: cannot read the checkpoint ({exc.strerror})") from None


def _folder_version(path: Path) -> tuple:
    """Changes when any file of the checkpoint (a folder, or one GGUF file) changes (names,
    sizes, times)."""
    try:
        if path.is_file():
            stat = path.stat()
            return ((path.name, stat.st_size, stat.st_mtime_ns),)
        return tuple(
            sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir())
        )
    except OSError:
        return ()

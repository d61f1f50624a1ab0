"""The model registry file (`--models models.yaml`): the models a server knows by name.

A malformed file or entry is refused with a message that names the file, the line and the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from warmserve.config import ConfigError, ModelSpec

FIELDS = {
    "name",
    "path",
    "tensor_parallel_size",
    "dtype",
    "max_model_len",
    "keep_alive",
    "pinned",
    "preload",
}
DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Longer than any server lives; larger integers would overflow a float.
MAX_KEEP_ALIVE_S = 10**12


class RegistryError(ValueError):
    pass


def parse_keep_alive(value) -> float:
    """Seconds from a number (seconds) or a duration such as "30s", "5m", "1h"; -1 = never."""
    if isinstance(value, bool):
        raise ConfigError("keep_alive must be a duration such as 30s, 5m, 1h, 0 or -1")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"keep_alive must be a finite number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = value
    else:
        match = DURATION.match(str(value))
        if not match:
            raise ConfigError(
                f"keep_alive must be a duration such as 30s, 5m, 1h, 0 or -1, not {value!r}"
            )
        seconds = float(match.group(1)) * UNIT_SECONDS[match.group(2)]
    # Every negative value means "never"; the cap keeps huge values from overflowing a float.
    return float(max(min(seconds, MAX_KEEP_ALIVE_S), -1))


def spec_from_fields(fields: dict) -> ModelSpec:
    """A ModelSpec from user-given fields (a registry entry or an admin request)."""
    unknown = set(fields) - FIELDS
    if unknown:
        raise ConfigError(f"unknown field {sorted(unknown)[0]!r}")
    for required in ("name", "path"):
        if not isinstance(fields.get(required), str) or not fields[required]:
            raise ConfigError(f"{required} is required and must be a string")
    values = dict(fields)
    if "keep_alive" in values:
        values["keep_alive"] = parse_keep_alive(values["keep_alive"])
    for flag in ("pinned", "preload"):
        if flag in values and not isinstance(values[flag], bool):
            raise ConfigError(f"{flag} must be true or false")
    for number in ("tensor_parallel_size", "max_model_len"):
        if (
            number in values
            and values[number] is not None
            and (isinstance(values[number], bool) or not isinstance(values[number], int))
        ):
            raise ConfigError(f"{number} must be an integer")
    return ModelSpec(**values)


def load_registry(path: str | Path) -> list[ModelSpec]:
    return [spec for _, spec in _registry_entries(Path(path))]


def check_registry_paths(path: str | Path, model_root: str | None) -> None:
    """Refuses (RegistryError naming the line and the entry) an entry whose path does not exist,
    is neither a checkpoint folder (config.json) nor a .gguf file, or lies outside `model_root`:
    a server checks this at start-up rather than have the first client find it."""
    root = Path(model_root).expanduser().resolve() if model_root else None
    for where, spec in _registry_entries(Path(path)):
        entry = f"{where} ({spec.name})"
        candidate = Path(spec.path).expanduser()
        if root is not None and not candidate.is_absolute():
            candidate = root / candidate
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise RegistryError(f"{entry}: path {spec.path!r} is not usable: {exc}") from None
        if root is not None and not resolved.is_relative_to(root):
            raise RegistryError(f"{entry}: path {spec.path!r} lies outside --model-root {root}")
        if resolved.is_file() and resolved.suffix.lower() == ".gguf":
            continue
        if not resolved.exists():
            raise RegistryError(f"{entry}: path {spec.path!r} not found ({resolved})")
        if not (resolved / "config.json").is_file():
            raise RegistryError(
                f"{entry}: {resolved} is neither a checkpoint folder (no config.json) "
                "nor a .gguf file"
            )


def _registry_entries(path: Path) -> list[tuple[str, ModelSpec]]:
    """Each entry's spec, with where it is written ("file:line: models[i]")."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read ({exc})") from exc
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from exc
    if root is None:
        return []
    models = _mapping_value(root, "models")
    if not isinstance(root, yaml.MappingNode) or models is None:
        raise RegistryError(
            f"{path}:{root.start_mark.line + 1}: expected a top-level 'models:' list"
        )
    if not isinstance(models, yaml.SequenceNode):
        raise RegistryError(f"{path}:{models.start_mark.line + 1}: 'models' must be a list")
    entries: list[tuple[str, ModelSpec]] = []
    for index, entry in enumerate(models.value):
        where = f"{path}:{entry.start_mark.line + 1}: models[{index}]"
        if not isinstance(entry, yaml.MappingNode):
            raise RegistryError(f"{where}: each model must be a mapping with name and path")
        fields = {}
        for key_node, value_node in entry.value:
            try:
                fields[key_node.value] = yaml.safe_load(yaml.serialize(value_node))
            except yaml.YAMLError as exc:
                raise RegistryError(f"{where}.{key_node.value}: {exc}") from exc
        try:
            spec = spec_from_fields(fields)
        except (ConfigError, TypeError) as exc:
            line = _field_line(entry, str(exc)) or entry.start_mark.line + 1
            raise RegistryError(f"{path}:{line}: models[{index}]: {exc}") from None
        if any(existing.name == spec.name for _, existing in entries):
            raise RegistryError(f"{where}.name: {spec.name!r} is listed twice")
        entries.append((where, spec))
    return entries


def _mapping_value(node, key: str):
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if key_node.value == key:
            return value_node
    return None


def _field_line(entry: yaml.MappingNode, message: str) -> int | None:
    """The line of the field a validation message is about, when it names one."""
    for key_node, _ in entry.value:
        if re.search(rf"\b{re.escape(key_node.value)}\b", message):
            return key_node.start_mark.line + 1
    return None

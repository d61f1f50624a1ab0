"""The registry file: valid entries parse; malformed ones name the line and the field."""

from __future__ import annotations

import pytest

from warmserve.config import ConfigError
from warmserve.controller.registry import (
    RegistryError,
    check_registry_paths,
    load_registry,
    parse_keep_alive,
)


def write(tmp_path, text):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_entries_parse_with_defaults_and_durations(tmp_path):
    specs = load_registry(
        write(
            tmp_path,
            "models:\n"
            "  - name: a\n    path: qwen\n    keep_alive: 30s\n    pinned: true\n"
            "  - name: b\n    path: opt\n    tensor_parallel_size: 2\n    keep_alive: -1\n"
            "  - name: c\n    path: llama\n",
        )
    )
    assert [(s.name, s.keep_alive, s.pinned, s.tensor_parallel_size) for s in specs] == [
        ("a", 30.0, True, 1),
        ("b", -1.0, False, 2),
        ("c", 300.0, False, 1),
    ]


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        (0, 0.0),
        ("-1", -1.0),
        (-(10**400), -1.0),
        (10**400, 1e12),
    ],
)
def test_keep_alive_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "soon", "1e400", True, [30]])
def test_keep_alive_refuses_what_is_not_a_duration(value):
    with pytest.raises(ConfigError, match="keep_alive"):
        parse_keep_alive(value)


@pytest.mark.parametrize(
    "text, where",
    [
        ("models:\n  - name: a\n    path: x\n    keep_alive: soon\n", ":4: models[0]: keep_alive"),
        ("models:\n  - name: a\n    path: x\n  - path: y\n", ":4: models[1]: name"),
        (
            "models:\n  - name: a\n    path: x\n    colour: red\n",
            ":4: models[0]: unknown field 'colour'",
        ),
        ("models:\n  - name: a\n    path: x\n    tensor_parallel_size: two\n", ":4:"),
        ("models:\n  - name: a\n    path: x\n  - name: a\n    path: y\n", "listed twice"),
        ("models: [1, 2\n", "not valid YAML"),
        ("models: 3\n", ":1: 'models' must be a list"),
        ("other: []\n", "expected a top-level 'models:' list"),
    ],
)
def test_malformed_files_name_line_and_field(tmp_path, text, where):
    with pytest.raises(RegistryError, match=None) as error:
        load_registry(write(tmp_path, text))
    assert where in str(error.value)
    assert "models.yaml" in str(error.value)


@pytest.fixture
def model_root(tmp_path):
    root = tmp_path / "models"
    (root / "folder").mkdir(parents=True)
    (root / "folder" / "config.json").write_text("{}")
    (root / "no-config").mkdir()
    (root / "small.gguf").write_bytes(b"GGUF")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    return root


def test_registry_paths_inside_the_root_pass(tmp_path, model_root):
    registry = "models:\n  - name: a\n    path: folder\n  - name: b\n    path: small.gguf\n"
    check_registry_paths(write(tmp_path, registry), str(model_root))


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("missing", "path 'missing' not found"),
        ("no-config", "neither a checkpoint folder (no config.json) nor a .gguf file"),
        ("../elsewhere", "lies outside --model-root"),
    ],
)
def test_a_bad_registry_path_names_the_entry(tmp_path, model_root, path, problem):
    registry = f"models:\n  - name: good\n    path: folder\n  - name: bad\n    path: {path}\n"
    file = write(tmp_path, registry)
    with pytest.raises(RegistryError) as raised:
        check_registry_paths(file, str(model_root))
    assert str(raised.value).startswith(f"{file}:4: models[1] (bad): ")
    assert problem in str(raised.value)

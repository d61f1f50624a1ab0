"""The GPU prefill kernel (layers/triton_prefill.py) run by Triton's interpreter on the CPU,
against the torch reference: a mixed step's decode rows, whole prompts and chunks after a cached
prefix; grouped and plain heads; a sliding window; both tile shapes; and the split that
attention.paged_prefill makes without a window, the decode rows through the decode kernel
(layers/triton_attention.py) and the rest through the prefill kernel, padding sequences (no
queries, as in a captured graph's step) included. The interpreter runs the kernels' own indexing
and masking in numpy; the compiled kernels' numbers (and bfloat16) are scripts/gpu_check.py's to
check on a GPU."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_attention import HEAD_DIM, MIXED_SEQS, build_paged_case

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
# (sequences as (context, new tokens), heads, kv heads, window, keys per kernel iteration)
CASES = [
    (MIXED_SEQS, 8, 2, None, 64),
    (MIXED_SEQS, 8, 2, 5, 16),
    (MIXED_SEQS, 4, 4, None, 16),
    (MIXED_SEQS + [(70, 33)], 14, 2, None, 16),  # 7 heads a group: spare rows in every tile
    ([(33, 1), (5, 1), (17, 2)], 8, 2, None, 16),  # few queries a sequence: 16-row tiles
    (MIXED_SEQS + [(1, 0), (1, 0)], 8, 2, None, 16),  # padding sequences: no queries
]


def kernel_errors() -> list[list]:
    """In the interpreted process: per case and path, the tile rows and the largest difference
    from the reference."""
    from warmserve.layers import triton_attention
    from warmserve.layers.attention import paged_prefill_reference, paged_prefill_triton
    from warmserve.layers.triton_prefill import paged_prefill_kernel, rows_per_tile

    triton_attention._multiprocessors = lambda device_index: 4  # no device to ask
    errors = []
    for seqs, heads, kv_heads, window, key_tile in CASES:
        q, k_cache, v_cache, meta, _ = build_paged_case(seqs, heads, kv_heads, torch.float32)
        query_start = torch.tensor([0, *itertools.accumulate(meta.query_lens)])
        scale = HEAD_DIM**-0.5
        reference = paged_prefill_reference(q, k_cache, v_cache, meta, scale, window)
        rows = rows_per_tile(heads // kv_heads, max(meta.query_lens))
        out = paged_prefill_kernel(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            query_start,
            max(meta.query_lens),
            scale,
            window,
            key_tile=key_tile,
        )
        errors.append([rows, False, (out - reference).abs().max().item()])
        if window is None:  # the path a GPU step takes: decode rows split off
            out = paged_prefill_triton(
                q, k_cache, v_cache, replace(meta, query_start=query_start), scale
            )
            errors.append([rows, True, (out - reference).abs().max().item()])
    return errors


def test_prefill_kernel_equals_the_reference_under_the_triton_interpreter():
    environment = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    script = "import json, test_triton_prefill as t; print(json.dumps(t.kernel_errors()))"
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert {rows for rows, _, _ in errors} == {16, 64}  # both tile shapes ran
    assert {split for _, split, _ in errors} == {False, True}  # both paths ran
    assert all(error < 1e-5 for _, _, error in errors), errors

"""The GPU prefill kernel (layers/triton_prefill.py) run by Triton's interpreter on the CPU,
against the torch reference: a mixed step's decode rows, whole prompts and chunks after a cached
prefix; grouped and plain heads; a sliding window; both tile shapes. The interpreter runs the
kernel's own indexing and masking in numpy; the compiled kernel's numbers (and bfloat16) are
scripts/gpu_check.py's to check on a GPU."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
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
]


def kernel_errors() -> list[float]:
    """In the interpreted process: the largest difference from the reference, per case."""
    from warmserve.layers.attention import paged_prefill_reference
    from warmserve.layers.triton_prefill import paged_prefill_kernel, rows_per_tile

    errors = []
    for seqs, heads, kv_heads, window, key_tile in CASES:
        q, k_cache, v_cache, meta, _ = build_paged_case(seqs, heads, kv_heads, torch.float32)
        query_start = torch.tensor([0, *itertools.accumulate(meta.query_lens)])
        scale = HEAD_DIM**-0.5
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
        reference = paged_prefill_reference(q, k_cache, v_cache, meta, scale, window)
        rows = rows_per_tile(heads // kv_heads, max(meta.query_lens))
        errors.append([rows, (out - reference).abs().max().item()])
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
    assert {rows for rows, _ in errors} == {16, 64}  # both tile shapes ran
    assert all(error < 1e-5 for _, error in errors), errors

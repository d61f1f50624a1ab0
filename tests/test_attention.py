"""The paged attention reference paths against plain dense causal attention."""

from __future__ import annotations

import math

import pytest
import torch

from warmserve.layers.attention import (
    AttentionMetadata,
    attend_one_sequence,
    gather_kv,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
    write_kv,
)

BLOCK_SIZE = 4
HEAD_DIM = 16
# (context length, new tokens): whole prompts, prompts after a cached prefix, single tokens,
# lengths on and around block boundaries.
PREFILL_SEQS = [(1, 1), (7, 7), (16, 16), (23, 5), (9, 1), (13, 12)]
# A mixed step: decode rows (one new token) around whole prompts and chunks after a prefix.
MIXED_SEQS = [(33, 1), (7, 7), (5, 1), (23, 5), (17, 1), (1, 1), (13, 12), (12, 1)]
DECODE_SEQS = [(1, 1), (4, 1), (5, 1), (17, 1), (33, 1), (12, 1)]
HEAD_LAYOUTS = [pytest.param(8, 2, id="gqa"), pytest.param(4, 4, id="mha")]
WINDOWS = [pytest.param(None, id="full"), pytest.param(5, id="window-5")]


def build_paged_case(seqs, num_heads, num_kv_heads, dtype, seed=0):
    """Random queries, keys and values; the keys and values written into a cache at random,
    non-contiguous blocks. Unwritten slots hold NaN, so that reading one shows."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(context / BLOCK_SIZE) for context, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    k_cache = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    tables, dense = [], []
    for (context, new), count in zip(seqs, blocks_per_seq, strict=True):
        table, order = order[:count], order[count:]
        keys = torch.randn(context, num_kv_heads, HEAD_DIM, generator=generator, dtype=dtype)
        values = torch.randn(context, num_kv_heads, HEAD_DIM, generator=generator, dtype=dtype)
        queries = torch.randn(new, num_heads, HEAD_DIM, generator=generator, dtype=dtype)
        slots = torch.tensor(
            [table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE for pos in range(context)]
        )
        write_kv(k_cache, v_cache, keys, values, slots)
        tables.append(table)
        dense.append((queries, keys, values))
    # Padding entries point at block 0, which may belong to another sequence.
    padded = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.long)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = torch.tensor(table)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),  # only write_kv reads it
        query_lens=[new for _, new in seqs],
        context_lens=torch.tensor([context for context, _ in seqs]),
        context_lens_host=[context for context, _ in seqs],
        block_tables=padded,
        max_context_len=max(context for context, _ in seqs),
        decode_only=all(new == 1 for _, new in seqs),
    )
    queries = torch.cat([queries for queries, _, _ in dense])
    return queries, k_cache, v_cache, meta, dense


def paged_prefill_from_cache(queries, k_cache, v_cache, meta, scale, window=None):
    """The reference prefill: every key and value read back through the block tables."""
    return paged_prefill_reference(queries, k_cache, v_cache, meta, scale, window)


def per_sequence_prefill(queries, k_cache, v_cache, meta, scale, window=None):
    """The reference as it was before decode rows were batched: one sequence at a time."""
    outputs, start = [], 0
    for i, query_len in enumerate(meta.query_lens):
        context_len = meta.context_lens_host[i]
        keys = gather_kv(k_cache, meta.block_tables[i], context_len)
        values = gather_kv(v_cache, meta.block_tables[i], context_len)
        outputs.append(
            attend_one_sequence(queries[start : start + query_len], keys, values, scale, window)
        )
        start += query_len
    return torch.cat(outputs)


def dense_causal_attention(queries, keys, values, scale, window):
    """Float64 softmax(q k^T) v over one sequence; queries are its last positions."""
    heads, kv_heads = queries.shape[1], keys.shape[1]
    keys = keys.double().repeat_interleave(heads // kv_heads, dim=1)
    values = values.double().repeat_interleave(heads // kv_heads, dim=1)
    context, new = keys.shape[0], queries.shape[0]
    scores = torch.einsum("qhd,khd->hqk", queries.double(), keys) * scale
    query_pos = torch.arange(context - new, context)[:, None]
    key_pos = torch.arange(context)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    scores = scores.masked_fill(~visible, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)


def expected_output(dense, scale, window):
    return torch.cat([dense_causal_attention(q, k, v, scale, window) for q, k, v in dense], dim=0)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
@pytest.mark.parametrize("window", WINDOWS)
def test_prefill_reference_equals_dense_attention(
    num_heads, num_kv_heads, dtype, tolerance, window
):
    queries, k_cache, v_cache, meta, dense = build_paged_case(
        PREFILL_SEQS, num_heads, num_kv_heads, dtype
    )
    scale = HEAD_DIM**-0.5
    out = paged_prefill_from_cache(queries, k_cache, v_cache, meta, scale, window)
    assert out.dtype == dtype
    error = (out.double() - expected_output(dense, scale, window)).abs().max().item()
    assert error < tolerance


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("window", WINDOWS)
def test_mixed_step_reference_equals_dense_and_the_per_sequence_path(
    num_heads, num_kv_heads, window
):
    queries, k_cache, v_cache, meta, dense = build_paged_case(
        MIXED_SEQS, num_heads, num_kv_heads, torch.float64, seed=2
    )
    scale = HEAD_DIM**-0.5
    batched = paged_prefill_from_cache(queries, k_cache, v_cache, meta, scale, window)
    expected = expected_output(dense, scale, window)
    assert (batched - expected).abs().max().item() < 1e-12
    looped = per_sequence_prefill(queries, k_cache, v_cache, meta, scale, window)
    assert (batched - looped).abs().max().item() < 1e-12


def test_a_whole_prompt_alone_attends_over_its_own_keys():
    """One whole prompt (a first token) skips the cache: its keys are this step's."""
    queries, k_cache, v_cache, meta, dense = build_paged_case([(13, 13)], 8, 2, torch.float64)
    _, keys, values = dense[0]
    scale = HEAD_DIM**-0.5
    empty = torch.full_like(k_cache, math.nan)  # a cache read would show as NaN
    out = paged_prefill(queries, keys, values, empty, empty, meta, scale)
    assert (out - expected_output(dense, scale, None)).abs().max().item() < 1e-12


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_reference_equals_dense_attention(num_heads, num_kv_heads, dtype, window):
    queries, k_cache, v_cache, meta, dense = build_paged_case(
        DECODE_SEQS, num_heads, num_kv_heads, dtype, seed=1
    )
    assert meta.decode_only
    scale = HEAD_DIM**-0.5
    out = paged_decode_reference(queries, k_cache, v_cache, meta, scale, window)
    assert out.dtype == dtype
    # The decode path computes in float32 whatever the input dtype (for bfloat16 caches).
    error = (out.double() - expected_output(dense, scale, window)).abs().max().item()
    assert error < 1e-5


def test_prefill_and_decode_references_agree_on_single_token_steps():
    queries, k_cache, v_cache, meta, _ = build_paged_case(DECODE_SEQS, 8, 2, torch.float32)
    scale = HEAD_DIM**-0.5
    decoded = paged_decode_reference(queries, k_cache, v_cache, meta, scale)
    prefilled = paged_prefill_from_cache(queries, k_cache, v_cache, meta, scale)
    assert (decoded - prefilled).abs().max().item() < 1e-6

"""Attention for a step that is not decode-only, in Triton (GPU only): every sequence of the step
in one launch, whatever it runs (a whole prompt, a prompt chunk after cached tokens, or one
decode token), keys and values read straight from the paged cache.

One program per (query tile, key/value head). A query tile is up to BLOCK_Q consecutive queries of
one sequence times the GROUP query heads that share the key/value head (grouped-query attention),
so the tile's rows are BLOCK_Q * GROUP (query, head) pairs and each key tile loaded serves all of
them. The program walks the sequence's cache up to its last query's position, a key tile at a
time, with an online softmax; the mask is causal with the cached prefix as offset (the queries
are a sequence's last positions) and, where the model has one, a sliding window.

Which sequence a program's tile belongs to is found on the device from the query start offsets
(cu_seqlens): sequence i's tiles are numbered from query_start[i] // BLOCK_Q + i on, so the grid
is tokens // BLOCK_Q + seqs programs long and the spare ones return at once. The torch reference
in attention.py is the oracle (scripts/gpu_check.py compares the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KEY_TILE = 64  # keys per loop iteration
# Tile rows in batch-invariant mode (EngineConfig.batch_invariant), whatever the step holds: the
# tile shape picks the tensor-core instructions, and with them how a row's sums round.
INVARIANT_ROWS = 64
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _tile_sequence(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose tiles include `tile` (binary search over the tile numbering)."""
    low: tl.int32 = 0
    high = num_seqs
    while low < high:
        middle = (low + high) // 2
        first_tile = tl.load(query_start_ptr + middle) // BLOCK_Q + middle
        if first_tile <= tile:
            low = middle + 1
        else:
            high = middle
    return low - 1


# Arguments that change from step to step: specialising on them (a value of 1, divisibility by 16,
# a pointer's alignment) would compile the kernel again for each new combination, seconds of a
# stalled step each time under traffic.
@triton.jit(
    do_not_specialize=[
        "block_tables_ptr",
        "context_lens_ptr",
        "query_start_ptr",
        "num_seqs",
        "stride_table_seq",
        "max_blocks",
    ]
)
def _prefill_kernel(
    q_ptr,  # [tokens, heads, head_dim]
    k_cache_ptr,  # [blocks, block_size, kv_heads, head_dim]
    v_cache_ptr,
    out_ptr,  # [tokens, heads, head_dim]
    block_tables_ptr,  # [seqs, max_blocks] int
    context_lens_ptr,  # [seqs] int: cached tokens after this step, its own included
    query_start_ptr,  # [seqs + 1] int: where each sequence's queries start in q
    scale,
    num_seqs,
    window,  # keys a query sees, itself included (ignored without SLIDING)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    max_blocks,
    GROUP: tl.constexpr,  # query heads per key/value head
    BLOCK_Q: tl.constexpr,  # queries per tile
    BLOCK_M: tl.constexpr,  # rows per tile: BLOCK_Q * GROUP, padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KEY_TILE: tl.constexpr,
    SLIDING: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 so results match the reference, else "tf32"
    SKIP_SINGLE_QUERIES: tl.constexpr,  # sequences with one query are the decode kernel's
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _tile_sequence(query_start_ptr, tile, num_seqs, BLOCK_Q)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    first_query = (tile - (query_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_query >= query_len:
        return  # a spare program: the grid counts one more tile per sequence than it may need
    if SKIP_SINGLE_QUERIES and query_len == 1:
        return
    context_len = tl.load(context_lens_ptr + seq)
    cached = context_len - query_len  # tokens before this step's queries

    rows = tl.arange(0, BLOCK_M)
    query = first_query + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (query < query_len)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr
        + (query_start + query)[:, None] * stride_q_token
        + head[:, None] * stride_q_head
        + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    position = cached + query  # of each row's query in its sequence

    # Keys up to the tile's last query (causal); with a window, none before its first query's.
    end_key = tl.minimum(context_len, cached + first_query + BLOCK_Q)
    start_key = 0
    if SLIDING:
        start_key = tl.maximum(0, cached + first_query - window + 1)
        start_key = start_key // KEY_TILE * KEY_TILE

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offsets_in_tile = tl.arange(0, KEY_TILE)
    for tile_start in range(start_key, end_key, KEY_TILE):
        keys = tile_start + offsets_in_tile
        key_ok = keys < end_key
        block_index = tl.minimum(keys // BLOCK_SIZE, max_blocks - 1)
        blocks = tl.load(block_tables_ptr + seq * stride_table_seq + block_index).to(tl.int64)
        offsets = (
            blocks[:, None] * stride_cache_block
            + (keys % BLOCK_SIZE)[:, None] * stride_cache_token
            + kv_head * stride_cache_head
            + dims[None, :]
        )
        # Slots past the context were never written for this sequence and may hold NaN: masked.
        k = tl.load(k_cache_ptr + offsets, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=key_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, KEY_TILE]
        visible = key_ok[None, :] & (keys[None, :] <= position[:, None])
        if SLIDING:
            visible = visible & (keys[None, :] > position[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row that has seen no key yet keeps -inf; exp(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp(running_max - safe_max)
        probs = tl.exp(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    # Every real row sees at least its own key, so its sum is positive; spare rows are not stored.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        out_ptr
        + (query_start + query)[:, None] * stride_out_token
        + head[:, None] * stride_out_head
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def rows_per_tile(group: int, max_query_len: int) -> int:
    """Tile rows: 16 (the smallest tensor-core tile) when every sequence brings a query or a
    few, else 64 so that a prompt's key tiles are loaded for more queries at once."""
    rows = 16 if max_query_len * group <= 16 else 64
    return max(rows, triton.next_power_of_2(group))


def paged_prefill_kernel(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    *,
    rows: int | None = None,
    skip_single_queries: bool = False,
    key_tile: int = KEY_TILE,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """q: [tokens, heads, head_dim], each sequence's queries back to back from query_start[i]
    (query_start has seqs + 1 entries, the last one `tokens`); they are the sequence's last
    positions, context_lens[i] tokens in all, all of them already in the cache. The keyword
    arguments tune the launch; `rows` fixes the rows of a query tile (else chosen from
    max_query_len). With `skip_single_queries` the rows of sequences with one query are left
    for the decode kernel (attention.paged_prefill): unwritten in the output."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    seqs = block_tables.shape[0]
    group = heads // kv_heads
    if rows is not None:
        block_m = max(rows, triton.next_power_of_2(group))
    else:
        block_m = rows_per_tile(group, max_query_len)
    block_q = block_m // group
    out = torch.empty_like(q)
    _prefill_kernel[(tokens // block_q + seqs, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        query_start,
        scale,
        seqs,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        block_tables.shape[1],
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        KEY_TILE=key_tile,
        SLIDING=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SKIP_SINGLE_QUERIES=skip_single_queries,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

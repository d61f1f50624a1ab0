"""Decode attention over the paged KV cache in Triton (GPU only), split along the context.

Pass 1: one program per (sequence, key/value head, context split). It loads the query heads that
share that KV head (grouped-query attention) and walks its share of the sequence's blocks, a tile
of several blocks at a time, with an online softmax; it writes a partial output with its running
max and sum. Pass 2 merges the splits. With few sequences the splits keep every SM busy; with many
there is one split and pass 2 is a cheap normalisation.

Every shape the kernels depend on is fixed by the batch size and the block-table width, and the
context lengths are read on the device, so both passes can be captured in a CUDA graph.

In a step that also runs prompt tokens (attention.paged_prefill) the same two passes take the
sequences that bring one query each, found on the device from the query start offsets: their
query rows are not the sequences' indices, and the other sequences' programs return at once.
The prefill kernel's query tiles are made for many queries; a decode row alone in one wastes
most of it and gets no context split.

The torch reference path in attention.py is the oracle (scripts/gpu_check.py compares the two).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TILE_BLOCKS = 4  # cache blocks per loop iteration: 64 tokens with 16-token blocks
PROGRAMS_PER_SM = 2  # context splits are added until there are this many programs per SM
NUM_STAGES = 2
# Warps per program. scripts/profile_gpu.py's sweep on an H200 found 4 best at batch 1 and at
# batch 64 (42.4 vs 44.5 us with 8 at the Qwen3-0.6B shape, 43.0 vs 45.2 at the 8B shape, 576
# tokens each); an earlier sweep on an H100 had found 8 better once programs outnumber SMs.
NUM_WARPS = 4


@triton.jit
def _query_row(query_start_ptr, seq, ROWS_FROM_STARTS: tl.constexpr):
    """The row of q that holds `seq`'s query: `seq` itself in a decode step; in a mixed step
    the sequence's first query row, or -1 unless it brings exactly one query (a prompt chunk is
    the prefill kernel's, a padding sequence has none)."""
    if ROWS_FROM_STARTS:
        start = tl.load(query_start_ptr + seq)
        single = tl.load(query_start_ptr + seq + 1) - start == 1
        return tl.where(single, start, -1)
    else:
        return seq.to(tl.int64)


# Arguments that change with the batch (see triton_prefill): specialising on them would compile
# the kernel again for each new combination while the model serves.
@triton.jit(
    do_not_specialize=[
        "block_tables_ptr",
        "context_lens_ptr",
        "query_start_ptr",
        "stride_table_seq",
        "max_blocks",
        "blocks_per_split",
        "splits",
    ]
)
def _partial_kernel(
    q_ptr,  # [seqs, heads, head_dim]
    k_cache_ptr,  # [blocks, block_size, kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [seqs, max_blocks] int
    context_lens_ptr,  # [seqs] int
    query_start_ptr,  # [seqs + 1] int, read with ROWS_FROM_STARTS only
    part_out_ptr,  # [seqs, heads, splits, head_dim] float32
    part_max_ptr,  # [seqs, heads, splits] float32
    part_sum_ptr,
    scale,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    max_blocks,
    blocks_per_split,
    splits,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a tensor-core-friendly size
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # tokens per iteration (TILE_BLOCKS * BLOCK_SIZE)
    PRECISION: tl.constexpr,  # "ieee" for float32 so results match the reference, else "tf32"
    ROWS_FROM_STARTS: tl.constexpr,  # q holds a mixed step's rows: see _query_row
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = _query_row(query_start_ptr, seq, ROWS_FROM_STARTS)
    if row < 0:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_token = split * blocks_per_split * BLOCK_SIZE
    end_token = tl.minimum(context_len, (split + 1) * blocks_per_split * BLOCK_SIZE)

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + row * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )

    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    offsets_in_tile = tl.arange(0, TILE)
    for tile_start in range(first_token, end_token, TILE):
        tokens = tile_start + offsets_in_tile
        valid = tokens < end_token
        block_index = tl.minimum(tokens // BLOCK_SIZE, max_blocks - 1)
        blocks = tl.load(block_tables_ptr + seq * stride_table_seq + block_index).to(tl.int64)
        offsets = (
            blocks[:, None] * stride_cache_block
            + (tokens % BLOCK_SIZE)[:, None] * stride_cache_token
            + kv_head * stride_cache_head
            + dims[None, :]
        )
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A split that has seen nothing yet keeps -inf; exp(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp(running_max - safe_max)
        probs = tl.exp(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    part = (seq * GROUP * tl.num_programs(1) + heads) * splits + split
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None])
    tl.store(part_max_ptr + part, running_max, mask=head_ok)
    tl.store(part_sum_ptr + part, running_sum, mask=head_ok)


@triton.jit(do_not_specialize=["query_start_ptr", "splits"])
def _merge_kernel(
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,  # [seqs, heads, head_dim], or a mixed step's [tokens, heads, head_dim]
    query_start_ptr,
    stride_out_seq,
    stride_out_head,
    heads_total,
    splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    ROWS_FROM_STARTS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = _query_row(query_start_ptr, seq, ROWS_FROM_STARTS)
    if row < 0:
        return
    split_ids = tl.arange(0, SPLITS_PAD)
    split_ok = split_ids < splits
    part = (seq * heads_total + head) * splits + split_ids
    maxes = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    overall = tl.max(maxes, axis=0)
    weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - overall))
    dims = tl.arange(0, HEAD_DIM)
    partial = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0
    )
    out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(
        out_ptr + row * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(
    seqs: int,
    kv_heads: int,
    max_blocks: int,
    device: torch.device,
    programs_per_sm: int = PROGRAMS_PER_SM,
    tile_blocks: int = TILE_BLOCKS,
) -> int:
    """Enough context splits for `programs_per_sm` programs per SM, never a split without a
    tile."""
    programs = seqs * kv_heads
    wanted = -(-programs_per_sm * _multiprocessors(device.index or 0) // programs)
    return max(1, min(wanted, -(-max_blocks // tile_blocks), 64))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    tile_blocks: int = TILE_BLOCKS,
    programs_per_sm: int = PROGRAMS_PER_SM,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    query_start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [seqs, heads, head_dim] (one query per sequence) -> [seqs, heads, head_dim]. With
    `query_start` ([seqs + 1], a mixed step's cu_seqlens), q is that step's [tokens, heads,
    head_dim] and only the rows of the sequences with one query are written, into `out`. The
    other keyword arguments tune the launch (scripts/profile_gpu.py sweeps them)."""
    _, heads, head_dim = q.shape
    seqs = block_tables.shape[0]
    _, block_size, kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    splits = split_count(seqs, kv_heads, max_blocks, q.device, programs_per_sm, tile_blocks)
    blocks_per_split = -(-max_blocks // splits)
    group = heads // kv_heads
    part_out = torch.empty(seqs, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_max = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    _partial_kernel[(seqs, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start if query_start is not None else context_lens,  # unread without it
        part_out,
        part_max,
        part_sum,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        max_blocks,
        blocks_per_split,
        splits,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=tile_blocks * block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROWS_FROM_STARTS=query_start is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if out is None:
        out = torch.empty_like(q)
    _merge_kernel[(seqs, heads)](
        part_out,
        part_max,
        part_sum,
        out,
        query_start if query_start is not None else context_lens,
        out.stride(0),
        out.stride(1),
        heads,
        splits,
        HEAD_DIM=head_dim,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        ROWS_FROM_STARTS=query_start is not None,
    )
    return out

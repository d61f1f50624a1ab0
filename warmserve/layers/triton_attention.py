"""Decode attention over the paged KV cache as one Triton kernel (GPU only).

One program per (sequence, key/value head): it loads the query heads that share that KV head
(grouped-query attention), walks the sequence's blocks through its block table with an online
softmax, and writes the output once. Every shape it depends on is a tensor value, not a Python
one, so the kernel can be captured in a CUDA graph. The torch reference path in attention.py is
its oracle (scripts/gpu_check.py compares the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [seqs, heads, head_dim]
    k_cache_ptr,  # [blocks, block_size, kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [seqs, max_blocks] int
    context_lens_ptr,  # [seqs] int
    out_ptr,  # [seqs, heads, head_dim]
    scale,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a tensor-core-friendly size
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 so results match the reference, else "tf32"
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )

    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    tokens = tl.arange(0, BLOCK_SIZE)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    for index in range(0, num_blocks):
        block = tl.load(block_tables_ptr + seq * stride_table_seq + index).to(tl.int64)
        offsets = (
            block * stride_cache_block
            + tokens[:, None] * stride_cache_token
            + kv_head * stride_cache_head
            + dims[None, :]
        )
        valid = index * BLOCK_SIZE + tokens < context_len
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        scores = (
            tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        )  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    out = acc / running_sum[:, None]
    tl.store(
        out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None],
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [seqs, heads, head_dim] (one query per sequence) -> [seqs, heads, head_dim]."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(seqs, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out

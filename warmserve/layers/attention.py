"""Attention over the paged KV cache.

The torch functions here are the reference path: they run on any device, CPU included, and are
the oracle that the GPU kernels are checked against.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.layers.norm import RMSNorm
from warmserve.layers.rotary import apply_rotary


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit: one entry per sequence, tokens laid out back to back."""

    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) of each token
    query_lens: list[int]  # new tokens of each sequence in this step
    context_lens: torch.Tensor  # [seqs] tokens in the cache after this step, new ones included
    context_lens_host: list[int]  # the same on the host: a prefill loop reads them without a sync
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids, padded with 0
    max_context_len: int
    decode_only: bool
    # [seqs + 1] where each sequence's queries start among the step's tokens (cu_seqlens), the
    # last entry the token count: the GPU prefill kernel finds its sequence with it.
    query_start: torch.Tensor | None = None
    # A captured graph's step (engine/mixed_graphs.py): sequences and tokens padded, host
    # lengths unknown at capture, so it takes the paged kernel whatever it holds.
    padded: bool = False


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)]
    return cache[blocks].flatten(0, 1)[:length]


def attend_one_sequence(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """queries [q, heads, dim] are the last q positions of keys/values [k, kv_heads, dim]."""
    query_len, context_len = queries.shape[0], keys.shape[0]
    group = queries.shape[1] // keys.shape[1]
    if queries.is_cuda and group > 1 and queries.dtype == torch.float32:
        # Only flash takes grouped heads, and flash takes no float32: the memory-efficient
        # kernel would fall back to the math path (some twenty operations a layer), so every
        # query head gets its own key/value head.
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    grouped = keys.shape[1] != queries.shape[1]
    # [1, heads, tokens, dim]: the fused kernels (flash, memory-efficient) take 4-d inputs only.
    queries, keys, values = (t.transpose(0, 1).unsqueeze(0) for t in (queries, keys, values))
    if query_len == context_len and sliding_window is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scale, enable_gqa=grouped
        )
    else:
        query_pos = torch.arange(context_len - query_len, context_len, device=queries.device)
        key_pos = torch.arange(context_len, device=queries.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=grouped
        )
    return out[0].transpose(0, 1)


def paged_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention for a step that is not decode-only. q, k, v: [tokens, heads, head_dim] of this
    step, already written into the cache; each sequence's queries are its last `query_len`
    positions, and a sequence may bring a whole prompt, a chunk after cached tokens, or one
    decode token. With a sliding window, each query sees only the last `sliding_window`
    positions (its own included)."""
    whole_prompt = len(meta.query_lens) == 1 and not meta.padded
    if whole_prompt and meta.query_lens[0] == meta.context_lens_host[0]:
        # One whole prompt (a first token): this step's keys are its whole context, and the
        # fused dense kernels (flash on GPU) are the fastest way through it.
        return attend_one_sequence(q, k, v, scale, sliding_window)
    if q.is_cuda:
        return paged_prefill_triton(q, k_cache, v_cache, meta, scale, sliding_window)
    return paged_prefill_reference(q, k_cache, v_cache, meta, scale, sliding_window)


def paged_prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """paged_prefill's path on a GPU (triton; `meta.query_start` on q's device)."""
    from warmserve.layers.triton_attention import paged_decode
    from warmserve.layers.triton_prefill import paged_prefill_kernel

    # The sequences with one query (decodes, mostly) go to the decode kernel, which splits
    # their contexts, unless a window bounds them (the decode kernel has none). The prefill
    # kernel leaves them whether or not the step has any: one variant of it per model, the
    # one that ModelRunner.warm_step_kernels compiles.
    split_decodes = sliding_window is None
    out = paged_prefill_kernel(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        meta.query_start,
        max(meta.query_lens),
        scale,
        sliding_window,
        skip_single_queries=split_decodes,
    )
    if split_decodes and (meta.padded or 1 in meta.query_lens):
        paged_decode(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale,
            query_start=meta.query_start,
            out=out,
        )
    return out


def paged_prefill_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The oracle for paged_prefill: every key and value read back through the block tables.
    The decode rows of a mixed step (one query each, usually most of its sequences) go through
    the batched decode reference together; each prompt or prompt chunk attends on its own."""
    if meta.padded:  # a graph's step: its lengths are on the device only
        starts = meta.query_start.tolist()
        meta = replace(
            meta,
            query_lens=[end - start for start, end in itertools.pairwise(starts)],
            context_lens_host=meta.context_lens.tolist(),
            padded=False,
        )
    out = torch.empty_like(q)
    ends = list(itertools.accumulate(meta.query_lens))
    singles = [i for i, query_len in enumerate(meta.query_lens) if query_len == 1]
    if singles:
        seqs = torch.tensor(singles, device=q.device)
        rows = torch.tensor([ends[i] - 1 for i in singles], device=q.device)
        contexts = [meta.context_lens_host[i] for i in singles]
        decode_meta = replace(
            meta,
            query_lens=[1] * len(singles),
            context_lens=meta.context_lens.index_select(0, seqs),
            context_lens_host=contexts,
            block_tables=meta.block_tables.index_select(0, seqs),
            max_context_len=max(contexts),
            decode_only=True,
            query_start=None,
        )
        out[rows] = paged_decode_reference(
            q.index_select(0, rows), k_cache, v_cache, decode_meta, scale, sliding_window
        )
    for i, query_len in enumerate(meta.query_lens):
        if query_len <= 1:  # a decode row (above), or a padding sequence with no queries
            continue
        context_len, end = meta.context_lens_host[i], ends[i]
        keys = gather_kv(k_cache, meta.block_tables[i], context_len)
        values = gather_kv(v_cache, meta.block_tables[i], context_len)
        out[end - query_len : end] = attend_one_sequence(
            q[end - query_len : end], keys, values, scale, sliding_window
        )
    return out


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [seqs, heads, head_dim], one query per sequence; all sequences in one batched pass."""
    seqs, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-meta.max_context_len // block_size)
    tables = meta.block_tables[:, :num_blocks]
    keys = k_cache[tables].view(seqs, num_blocks * block_size, kv_heads, head_dim)
    values = v_cache[tables].view(seqs, num_blocks * block_size, kv_heads, head_dim)
    # Float32 at least whatever the input dtype (bfloat16 caches); float64 stays float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    grouped = q.view(seqs, kv_heads, heads // kv_heads, head_dim).to(compute)
    scores = torch.einsum("bkgd,bskd->bkgs", grouped, keys.to(compute)) * scale
    positions = torch.arange(num_blocks * block_size, device=q.device)
    beyond = positions[None, :] >= meta.context_lens[:, None]
    if sliding_window is not None:
        # The query sits at context_len - 1.
        beyond |= positions[None, :] <= meta.context_lens[:, None] - 1 - sliding_window
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    # Slots past a sequence's context were never written for it and may hold anything, NaN
    # included (fresh cache memory, or a freed block): a zero weight times NaN is still NaN.
    values = values.to(compute).masked_fill(beyond[:, :, None, None], 0.0)
    out = torch.einsum("bkgs,bskd->bkgd", probs, values)
    return out.reshape(seqs, heads, head_dim).to(q.dtype)


class PagedAttention(nn.Module):
    """Splits a fused q/k/v projection into heads (normed and rotated as the model asks), writes
    the keys and values into the cache, then attends over the cache."""

    batch_invariant = False  # set by layers/batch_invariance.py

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        # Views into the runner's KV cache, set when the cache is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        qkv: torch.Tensor,
        meta: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """qkv: [tokens, (heads + 2 * kv_heads) * head_dim], the fused projection's output.
        Queries and keys get the per-head RMSNorm and the rotary embedding where given."""
        on_gpu = qkv.is_cuda
        if on_gpu:
            from warmserve.layers.triton_fused import prepare_qkv  # triton: GPU hosts only

            qk_norm = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else None
            q, k, v = prepare_qkv(
                qkv,
                self.num_heads,
                self.num_kv_heads,
                rotary,
                qk_norm,
                self.k_cache,
                self.v_cache,
                meta.slot_mapping,
                store_kv=not meta.decode_only,
            )
        else:
            q, k, v = self.split_heads(qkv)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        if self.batch_invariant:
            out = self.attend_batch_invariant(q, meta)
        elif not meta.decode_only:
            out = paged_prefill(
                q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window
            )
        elif on_gpu and self.sliding_window is None:
            from warmserve.layers.triton_attention import paged_decode  # triton: GPU hosts only

            out = paged_decode(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale
            )
        else:
            out = paged_decode_reference(
                q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window
            )
        return out.reshape(-1, self.num_heads * self.head_dim)

    def attend_batch_invariant(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Every query through one kernel with one tile shape: a token attends in the same
        order whether it is a decode, in a prompt chunk or in a whole prompt, and whatever
        else the step runs (the decode kernel splits the context by the batch's size, and a
        whole prompt would take flash attention)."""
        from warmserve.layers.triton_prefill import INVARIANT_ROWS, paged_prefill_kernel

        query_start = meta.query_start
        if query_start is None:  # a decode graph's step: one query per sequence
            query_start = torch.arange(q.shape[0] + 1, device=q.device)
        return paged_prefill_kernel(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.context_lens,
            query_start,
            1,  # unused: the tile shape is fixed
            self.scale,
            self.sliding_window,
            rows=INVARIANT_ROWS,
        )

    def split_heads(self, qkv: torch.Tensor):
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        return (
            q.reshape(-1, self.num_heads, self.head_dim),
            k.reshape(-1, self.num_kv_heads, self.head_dim),
            v.reshape(-1, self.num_kv_heads, self.head_dim),
        )

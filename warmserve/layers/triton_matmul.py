"""A linear layer whose every output row is the same whatever rows share its batch (GPU only).

cuBLAS picks its kernel, tiling and split of the reduction from the shape of the product, so a
token's projection in bf16 rounds differently when it is computed beside 63 other tokens than
alone; in greedy decoding one rounding difference can change the next token, and two answers
to one request then differ by how busy the server was. Here every output element is reduced
over the input features in one fixed order (tiles of BLOCK_K, no split reduction) with one
fixed tile shape, chosen from nothing that depends on the batch, so a row's result depends on
that row and the weights only (the "batch-invariant" matmul of Thinking Machines' "Defeating
Nondeterminism in LLM Inference", and vLLM's batch-invariant mode). It is slower than cuBLAS;
EngineConfig.batch_invariant chooses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 4


# The row count and row strides change from step to step; specialising on them (a value of 1,
# divisibility by 16) would compile another kernel for some batches, which might round
# differently.
@triton.jit(do_not_specialize=["rows", "stride_x", "stride_out"])
def _linear_kernel(
    x_ptr,  # [rows, in_features]
    weight_ptr,  # [out_features, in_features]
    bias_ptr,
    out_ptr,  # [rows, out_features]
    rows,
    out_features,
    in_features,
    stride_x,
    stride_weight,
    stride_out,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32, so that float32 stays float32
):
    # Programs along the output features first: the ones running together share input rows.
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    row_ids = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ids = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ids = tl.arange(0, BLOCK_K)
    row_ok = row_ids < rows
    col_ok = col_ids < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        ks = k_start + k_ids
        k_ok = ks < in_features
        x = tl.load(
            x_ptr + row_ids[:, None].to(tl.int64) * stride_x + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + col_ids[None, :].to(tl.int64) * stride_weight + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_ids, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + row_ids[:, None].to(tl.int64) * stride_out + col_ids[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in_features] @ weight.T (+ bias), as F.linear, each row on its own."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out_features = weight.shape[0]
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(*x.shape[:-1], out_features)
    grid = (triton.cdiv(out_features, BLOCK_N), triton.cdiv(rows.shape[0], BLOCK_M))
    _linear_kernel[grid](
        rows,
        weight,
        bias if bias is not None else weight,
        out,
        rows.shape[0],
        out_features,
        in_features,
        rows.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out.view(*x.shape[:-1], out_features)

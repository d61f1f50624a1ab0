"""Fused elementwise kernels in Triton (GPU only): RMSNorm with the residual add, rotary
embedding, SiLU-and-multiply.

A decode step under a CUDA graph costs a few microseconds per kernel whatever it does, and an
eager prefill (a swap's first token) pays Python dispatch per operation; each of these replaces
four to eight torch operations with one launch. They round exactly where the torch reference
does (norm.py, rotary.py, llama.py), which scripts/gpu_check.py checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    normed = (xf * rstd).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """RMSNorm over the last dim; with `residual`, normalises x + residual and returns
    (normed, x + residual)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    out = torch.empty(rows.shape, dtype=weight.dtype, device=x.device)
    residual_rows = residual.reshape(-1, shape[-1]) if residual is not None else rows
    residual_out = (
        torch.empty(rows.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    )
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        residual_rows,
        weight,
        out,
        residual_out,
        rows.stride(0),
        residual_rows.stride(0),
        out.stride(0),
        shape[-1],
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(shape[-1]),
    )
    if residual is None:
        return out.view(shape)
    return out.view(shape), residual_out.view(shape)


@triton.jit
def _rotary_kernel(
    x_ptr,  # [tokens, heads, head_dim]
    cos_ptr,  # [tokens, head_dim] float32
    sin_ptr,
    out_ptr,
    stride_x_token,
    stride_x_head,
    stride_cos,
    heads,
    HALF: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, HALF)
    base = x_ptr + token * stride_x_token + head * stride_x_head
    first = tl.load(base + cols).to(tl.float32)
    second = tl.load(base + HALF + cols).to(tl.float32)
    cos_first = tl.load(cos_ptr + token * stride_cos + cols)
    cos_second = tl.load(cos_ptr + token * stride_cos + HALF + cols)
    sin_first = tl.load(sin_ptr + token * stride_cos + cols)
    sin_second = tl.load(sin_ptr + token * stride_cos + HALF + cols)
    out = out_ptr + (token * heads + head) * 2 * HALF
    dtype = out_ptr.dtype.element_ty
    tl.store(out + cols, (first * cos_first - second * sin_first).to(dtype))
    tl.store(out + HALF + cols, (second * cos_second + first * sin_second).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin: [tokens, 1, head_dim] float32 (rotate-half)."""
    tokens, heads, head_dim = x.shape
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    cos_rows, sin_rows = cos.reshape(tokens, head_dim), sin.reshape(tokens, head_dim)
    _rotary_kernel[(tokens, heads)](
        x,
        cos_rows,
        sin_rows,
        out,
        x.stride(0),
        x.stride(1),
        cos_rows.stride(0),
        heads,
        HALF=head_dim // 2,
    )
    return out


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    # torch's silu rounds to the input dtype before the multiply; so does this.
    activated = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _silu_and_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out

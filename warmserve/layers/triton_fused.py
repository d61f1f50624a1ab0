"""Fused elementwise kernels in Triton (GPU only): RMSNorm with the residual add, rotary
embedding, SiLU-and-multiply, and the step from a fused q/k/v projection to the KV cache.

A decode step under a CUDA graph costs a few microseconds per kernel whatever it does, and an
eager prefill (a swap's first token) pays Python dispatch per operation; each of these replaces
four to eight torch operations with one launch. They round exactly where the torch reference
does (norm.py, rotary.py, attention.py, llama.py), which scripts/gpu_check.py checks.
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
def _silu_and_mul_kernel(x_ptr, out_ptr, n, width, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    row = offsets // width
    gate_offsets = row * 2 * width + offsets % width  # x is [rows, gate | up]
    gate = tl.load(x_ptr + gate_offsets, mask=mask, other=0.0)
    up = tl.load(x_ptr + gate_offsets + width, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    # torch's silu rounds to the input dtype before the multiply; so does this.
    activated = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 * width] (the gate, then the up projection) -> silu(gate) * up."""
    width = gate_up.shape[-1] // 2
    x = gate_up.contiguous()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    n = out.numel()
    block = 1024
    _silu_and_mul_kernel[(triton.cdiv(n, block),)](x, out, n, width, BLOCK=block)
    return out


# The slots are a view into the step's metadata at an offset that changes with its token count:
# specialising on their alignment would compile the kernel again for odd and even counts.
@triton.jit(do_not_specialize=["slots_ptr"])
def _prepare_qkv_kernel(
    qkv_ptr,  # [tokens, (heads + 2 * kv_heads) * head_dim]
    cos_ptr,  # [tokens, head_dim] float32
    sin_ptr,
    q_norm_ptr,  # [head_dim]
    k_norm_ptr,
    slots_ptr,  # [tokens] cache slot of each token
    q_out_ptr,  # [tokens, heads, head_dim]
    k_out_ptr,  # [tokens, kv_heads, head_dim]
    v_out_ptr,
    k_cache_ptr,  # [slots, kv_heads, head_dim] (blocks flattened)
    v_cache_ptr,
    stride_qkv,
    stride_cos,
    stride_cache_slot,
    eps,
    heads,
    kv_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)  # query heads, then key heads, then value heads
    cols = tl.arange(0, HALF_PAD)
    mask = cols < HALF
    source = qkv_ptr + token * stride_qkv + head * 2 * HALF
    first = tl.load(source + cols, mask=mask, other=0.0)
    second = tl.load(source + HALF + cols, mask=mask, other=0.0)
    dtype = first.dtype
    if head < heads + kv_heads:
        if HAS_NORM:
            if head < heads:
                norm_ptr = q_norm_ptr
            else:
                norm_ptr = k_norm_ptr
            first_f, second_f = first.to(tl.float32), second.to(tl.float32)
            squares = tl.sum(first_f * first_f, axis=0) + tl.sum(second_f * second_f, axis=0)
            rstd = 1.0 / tl.sqrt(squares / (2 * HALF) + eps)
            weight_first = tl.load(norm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            weight_second = tl.load(norm_ptr + HALF + cols, mask=mask, other=0.0).to(tl.float32)
            first = ((first_f * rstd).to(dtype).to(tl.float32) * weight_first).to(dtype)
            second = ((second_f * rstd).to(dtype).to(tl.float32) * weight_second).to(dtype)
        if HAS_ROTARY:
            cos_first = tl.load(cos_ptr + token * stride_cos + cols, mask=mask, other=0.0)
            cos_second = tl.load(cos_ptr + token * stride_cos + HALF + cols, mask=mask, other=0.0)
            sin_first = tl.load(sin_ptr + token * stride_cos + cols, mask=mask, other=0.0)
            sin_second = tl.load(sin_ptr + token * stride_cos + HALF + cols, mask=mask, other=0.0)
            first_f, second_f = first.to(tl.float32), second.to(tl.float32)
            first = (first_f * cos_first - second_f * sin_first).to(dtype)
            second = (second_f * cos_second + first_f * sin_second).to(dtype)
    if head < heads:
        target = q_out_ptr + (token * heads + head) * 2 * HALF
        tl.store(target + cols, first, mask=mask)
        tl.store(target + HALF + cols, second, mask=mask)
    else:
        if head < heads + kv_heads:
            kv_head = head - heads
            cache_ptr = k_cache_ptr
            out_ptr = k_out_ptr
        else:
            kv_head = head - heads - kv_heads
            cache_ptr = v_cache_ptr
            out_ptr = v_out_ptr
        slot = tl.load(slots_ptr + token).to(tl.int64)
        cache = cache_ptr + slot * stride_cache_slot + kv_head * 2 * HALF
        tl.store(cache + cols, first, mask=mask)
        tl.store(cache + HALF + cols, second, mask=mask)
        if STORE_KV:
            target = out_ptr + (token * kv_heads + kv_head) * 2 * HALF
            tl.store(target + cols, first, mask=mask)
            tl.store(target + HALF + cols, second, mask=mask)


def prepare_qkv(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    store_kv: bool,
):
    """One launch for what follows the fused q/k/v projection: split into heads, RMSNorm of q
    and k (`qk_norm` = (q weight, k weight, eps)), rotary embedding, and the keys and values
    written into the paged cache at `slots`. Returns q [tokens, heads, head_dim] and, with
    `store_kv` (a prefill attends over its own keys), k and v; else None for those two."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = v = None
    if store_kv:
        k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
    cos, sin = (c.reshape(tokens, head_dim) for c in rotary) if rotary is not None else (q, q)
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _prepare_qkv_kernel[(tokens, heads + 2 * kv_heads)](
        qkv,
        cos,
        sin,
        q_weight,
        k_weight,
        slots,
        q,
        k if store_kv else q,
        v if store_kv else q,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(-3),
        eps,
        heads,
        kv_heads,
        HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        HAS_NORM=qk_norm is not None,
        HAS_ROTARY=rotary is not None,
        STORE_KV=store_kv,
    )
    return q, k, v

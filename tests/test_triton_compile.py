"""The attention kernels compile for an H100/H200 (sm_90) on a host without a GPU. Triton's
interpreter (test_triton_prefill) runs a kernel's logic in numpy but skips the compiler's type
checks: a helper that returns an int32 on one path and an int64 on another runs there and fails
to compile on the GPU. Each launch the public wrappers make is recorded instead of run, with the
arguments they pass, then compiled through to a cubin with Triton's bundled ptxas."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from warmserve.layers import triton_attention, triton_prefill  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class RecordedKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    return "fp32"


def compile_launch(kernel, args: tuple, kwargs: dict) -> None:
    constexprs = {name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS}
    signature = {
        name: "constexpr" if name in constexprs else argument_type(value)
        for name, value in zip(kernel.arg_names, [*args, *constexprs.values()], strict=True)
    }
    options = {name: kwargs[name] for name in LAUNCH_OPTIONS if name in kwargs}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=SM90, options=options)


def paged_case(tokens_per_seq: list[int], heads=16, kv_heads=8, head_dim=128, blocks=8):
    """Tensors of a bf16 step at the Qwen3-0.6B head layout (contents unused: nothing runs)."""
    seqs, tokens = len(tokens_per_seq), sum(tokens_per_seq)
    cache = torch.zeros(seqs * blocks, 16, kv_heads, head_dim, dtype=torch.bfloat16)
    q = torch.zeros(tokens, heads, head_dim, dtype=torch.bfloat16)
    tables = torch.zeros(seqs, blocks, dtype=torch.long)
    context_lens = torch.full((seqs,), 100, dtype=torch.long)
    query_start = torch.tensor([0, *torch.tensor(tokens_per_seq).cumsum(0).tolist()])
    return q, cache, tables, context_lens, query_start


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(triton_attention, "_multiprocessors", lambda device_index: 132)
    kernels = {
        "partial": RecordedKernel(triton_attention._partial_kernel),
        "merge": RecordedKernel(triton_attention._merge_kernel),
        "prefill": RecordedKernel(triton_prefill._prefill_kernel),
    }
    monkeypatch.setattr(triton_attention, "_partial_kernel", kernels["partial"])
    monkeypatch.setattr(triton_attention, "_merge_kernel", kernels["merge"])
    monkeypatch.setattr(triton_prefill, "_prefill_kernel", kernels["prefill"])
    return kernels


def test_every_attention_launch_compiles_for_sm90(recorded):
    q, cache, tables, context_lens, _ = paged_case([1] * 4)
    triton_attention.paged_decode(q, cache, cache, tables, context_lens, 0.1)
    # A mixed step: the decode rows through the decode kernel, the rest through the prefill
    # kernel (attention.paged_prefill's split; 16- and 64-row query tiles), the prefill kernel
    # alone with a window, and alone for every row (the batch-invariant path).
    q, cache, tables, context_lens, query_start = paged_case([1, 1, 40, 1])
    triton_attention.paged_decode(
        q, cache, cache, tables, context_lens, 0.1, query_start=query_start, out=torch.empty_like(q)
    )
    invariant = triton_prefill.INVARIANT_ROWS
    for max_query_len, skip, window, rows in (
        (2, True, None, None),
        (40, True, None, None),
        (40, False, 32, None),
        (1, False, None, invariant),
    ):
        triton_prefill.paged_prefill_kernel(
            q,
            cache,
            cache,
            tables,
            context_lens,
            query_start,
            max_query_len,
            0.1,
            window,
            rows=rows,
            skip_single_queries=skip,
        )
    launches = [
        (kernels.kernel, launch) for kernels in recorded.values() for launch in kernels.launches
    ]
    assert [len(kernels.launches) for kernels in recorded.values()] == [2, 2, 4]
    for kernel, (args, kwargs) in launches:
        compile_launch(kernel, args, kwargs)

"""GPU correctness check (run on a GPU machine, not in CI): every GPU kernel against the CPU
reference path, and float32 greedy output on the GPU against transformers.

    python scripts/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch
from gpu_engine_checks import (  # scripts/, beside this file
    check_async_scheduling,
    check_graphs_in_idle_gaps,
    check_greedy_against_transformers,
)

from warmserve.layers.attention import (
    AttentionMetadata,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
)
from warmserve.layers.triton_attention import paged_decode


def save_report(report: dict, out: str | None, name: str) -> str:
    """The report as JSON, also written to OUT/`name` when the script has an --out folder."""
    text = json.dumps(report, indent=1)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, name).write_text(text)
    return text


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm()).item()


def random_paged_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, device, generator):
    context_lens = torch.randint(1, 700, (seqs,), generator=generator)
    blocks_per_seq = [-(-int(n) // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(seqs, max(blocks_per_seq), dtype=torch.int32)
    cursor = 0
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = torch.tensor(order[cursor : cursor + count])
        cursor += count
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(device, dtype)
    v_cache = torch.randn(shape, generator=generator).to(device, dtype)
    q = torch.randn(seqs, heads, head_dim, generator=generator).to(device, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(seqs, dtype=torch.long, device=device),
        query_lens=[1] * seqs,
        context_lens=context_lens.to(device),
        context_lens_host=context_lens.tolist(),
        block_tables=tables.to(device),
        max_context_len=int(context_lens.max()),
        decode_only=True,
    )
    return q, k_cache, v_cache, meta


def check_decode_kernel(report: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, head_dim in ((32, 8, 128), (16, 16, 64), (14, 2, 64), (4, 2, 16)):
            q, k_cache, v_cache, meta = random_paged_batch(
                37, heads, kv_heads, head_dim, 16, dtype, "cuda", generator
            )
            out = torch.full_like(q, float("nan"))
            out.copy_(paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1))
            ref = paged_decode_reference(
                q.double().cpu(),
                k_cache.double().cpu(),
                v_cache.double().cpu(),
                _cpu_meta(meta),
                0.1,
            )
            key = f"decode {str(dtype)[6:]} h{heads}/kv{kv_heads}/d{head_dim}"
            report[key] = relative_error(out, ref)


def _cpu_meta(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping.cpu(),
        query_lens=meta.query_lens,
        context_lens=meta.context_lens.cpu().long(),
        context_lens_host=meta.context_lens_host,
        block_tables=meta.block_tables.cpu().long(),
        max_context_len=meta.max_context_len,
        decode_only=meta.decode_only,
        query_start=None if meta.query_start is None else meta.query_start.cpu(),
    )


def random_mixed_step(shape, heads, kv_heads, head_dim, block_size, dtype, generator):
    """A step of sequences given as (cached tokens, new tokens), written into a paged cache at
    random blocks; returns q, k, v of the step's tokens, the caches and the metadata."""
    blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in shape]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    # Slots no sequence owns hold NaN, so that a read past a context shows.
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    tables = torch.zeros(len(shape), max(blocks_per_seq), dtype=torch.long)
    step_slots, cursor = [], 0
    for row, ((cached, new), count) in enumerate(zip(shape, blocks_per_seq, strict=True)):
        tables[row, :count] = torch.tensor(order[cursor : cursor + count])
        cursor += count
        slots = [
            int(tables[row, p // block_size]) * block_size + p % block_size
            for p in range(cached + new)
        ]
        context = torch.randn(cached + new, 2, kv_heads, head_dim, generator=generator)
        index = torch.tensor(slots, device="cuda")
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, index, context[:, 0].to("cuda", dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, index, context[:, 1].to("cuda", dtype))
        step_slots += slots[cached:]
    tokens = sum(new for _, new in shape)
    slot_mapping = torch.tensor(step_slots, device="cuda")
    q = torch.randn(tokens, heads, head_dim, generator=generator).to("cuda", dtype)
    k = k_cache.view(-1, kv_heads, head_dim)[slot_mapping]
    v = v_cache.view(-1, kv_heads, head_dim)[slot_mapping]
    query_lens = [new for _, new in shape]
    context_lens = [cached + new for cached, new in shape]
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_lens=query_lens,
        context_lens=torch.tensor(context_lens, device="cuda"),
        context_lens_host=context_lens,
        block_tables=tables.cuda(),
        max_context_len=max(context_lens),
        decode_only=False,
        query_start=torch.tensor([0, *itertools.accumulate(query_lens)], device="cuda"),
    )
    return q, k, v, k_cache, v_cache, meta


# (cached tokens, new tokens) per sequence: decode rows among whole prompts and chunks after a
# cached prefix; decode rows only; one whole prompt alone (the flash fast path); one chunk.
MIXED_STEPS = {
    "mixed": [(600, 1), (0, 130), (37, 1), (256, 256), (5, 1), (0, 1), (1000, 24), (63, 1)],
    "decode rows": [(int(n), 1) for n in torch.randint(0, 900, (40,)).tolist()],
    "whole prompt": [(0, 300)],
    "chunk after prefix": [(512, 200)],
}


def check_mixed_step_attention(report: dict) -> None:
    """paged_prefill (the Triton kernel, or flash for one whole prompt) against the float64
    reference on random paged steps; GQA and plain heads; float32 and bfloat16; a window."""
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, head_dim in ((32, 8, 128), (16, 16, 64), (14, 2, 64)):
            for name, shape in MIXED_STEPS.items():
                for window in (None, 100):
                    q, k, v, k_cache, v_cache, meta = random_mixed_step(
                        shape, heads, kv_heads, head_dim, 16, dtype, generator
                    )
                    out = paged_prefill(q, k, v, k_cache, v_cache, meta, 0.088, window)
                    ref = paged_prefill_reference(
                        q.double().cpu(),
                        k_cache.double().cpu(),
                        v_cache.double().cpu(),
                        _cpu_meta(meta),
                        0.088,
                        window,
                    )
                    label = f"window {window}" if window else "full"
                    key = (
                        f"prefill {name} {str(dtype)[6:]} h{heads}/kv{kv_heads}/d{head_dim} {label}"
                    )
                    report[key] = relative_error(out, ref)


def time_mixed_step_attention(report: dict) -> None:
    """One layer's attention for a mixed step at the 8B shape (63 decode rows of 600 tokens and
    a 512-token prompt chunk after 512 cached), bf16: the batched kernel against the per-sequence
    loop it replaced (each sequence's keys gathered, then SDPA)."""
    from warmserve.layers.attention import attend_one_sequence, gather_kv

    generator = torch.Generator().manual_seed(5)
    shape = [(600, 1)] * 63 + [(512, 512)]
    q, k, v, k_cache, v_cache, meta = random_mixed_step(
        shape, 32, 8, 128, 16, torch.bfloat16, generator
    )

    def per_sequence():
        out, start = torch.empty_like(q), 0
        for i, query_len in enumerate(meta.query_lens):
            context = meta.context_lens_host[i]
            keys = gather_kv(k_cache, meta.block_tables[i], context)
            values = gather_kv(v_cache, meta.block_tables[i], context)
            out[start : start + query_len] = attend_one_sequence(
                q[start : start + query_len], keys, values, 0.088
            )
            start += query_len
        return out

    def batched():
        return paged_prefill(q, k, v, k_cache, v_cache, meta, 0.088)

    for name, run in (("batched kernel", batched), ("per-sequence loop", per_sequence)):
        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            run()
        end.record()
        end.synchronize()
        report[f"mixed step attention 8B shape, one layer, ms ({name})"] = round(
            start.elapsed_time(end) / 20, 3
        )


def check_fused_kernels(report: dict) -> None:
    """Each fused Triton kernel against the torch reference it replaces, on the same inputs."""
    from warmserve.layers import rotary, triton_fused
    from warmserve.layers.norm import RMSNorm

    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        x = torch.randn(37, 1024, generator=generator).to(dtype)
        residual = torch.randn(37, 1024, generator=generator).to(dtype)
        norm = RMSNorm(1024, 1e-6)
        norm.weight.data = (1 + 0.1 * torch.randn(1024, generator=generator)).to(dtype)
        ref_out, ref_residual = norm(x, residual)
        norm.cuda()
        out, new_residual = triton_fused.rms_norm(x.cuda(), norm.weight, 1e-6, residual.cuda())
        report[f"rms_norm+residual {name}"] = relative_error(out, ref_out)
        report[f"residual sum {name}"] = relative_error(new_residual, ref_residual)
        heads = torch.randn(37, 16, 128, generator=generator).to(dtype)
        emb = rotary.RotaryEmbedding(128, 1e6)
        cos, sin = emb(torch.arange(37) * 13)
        reference = rotary.apply_rotary(heads, cos, sin)
        fused = triton_fused.apply_rotary(heads.cuda(), cos.cuda(), sin.cuda())
        report[f"rotary {name}"] = relative_error(fused, reference)
        gate_up = torch.randn(37, 2 * 3072, generator=generator).to(dtype)
        gate, up = gate_up.split(3072, dim=-1)
        reference = torch.nn.functional.silu(gate) * up
        report[f"silu_and_mul {name}"] = relative_error(
            triton_fused.silu_and_mul(gate_up.cuda()), reference
        )
        check_prepare_qkv(report, dtype, generator)


def check_prepare_qkv(report: dict, dtype: torch.dtype, generator: torch.Generator) -> None:
    """The fused split/q-k norm/rotary/cache-write kernel against PagedAttention's CPU path, for
    Qwen3 (norm and rotary), Llama (rotary) and OPT (neither) head layouts."""
    from warmserve.layers import triton_fused
    from warmserve.layers.attention import PagedAttention
    from warmserve.layers.norm import RMSNorm
    from warmserve.layers.rotary import RotaryEmbedding, apply_rotary

    for label, heads, kv_heads, head_dim, with_norm, with_rotary in (
        ("qwen3", 16, 8, 128, True, True),
        ("llama", 32, 8, 128, False, True),
        ("opt", 12, 12, 64, False, False),
    ):
        tokens, blocks, block_size = 37, 8, 16
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
        qkv = qkv.to(dtype)
        slots = torch.randperm(blocks * block_size, generator=generator)[:tokens]
        attention = PagedAttention(heads, head_dim, kv_heads, head_dim**-0.5)
        norms = None
        if with_norm:
            norms = (RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6))
            for norm in norms:
                norm.weight.data = (1 + 0.1 * torch.randn(head_dim, generator=generator)).to(dtype)
        rotary = RotaryEmbedding(head_dim, 1e6)(torch.arange(tokens) * 7) if with_rotary else None
        q, k, v = attention.split_heads(qkv)
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        cache = torch.zeros(2, blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
        fused_q, fused_k, fused_v = triton_fused.prepare_qkv(
            qkv.cuda(),
            heads,
            kv_heads,
            tuple(t.cuda() for t in rotary) if rotary is not None else None,
            (norms[0].weight.cuda(), norms[1].weight.cuda(), 1e-6) if norms else None,
            cache[0],
            cache[1],
            slots.cuda(),
            store_kv=True,
        )
        cached_k = cache[0].view(-1, kv_heads, head_dim)[slots.cuda()]
        cached_v = cache[1].view(-1, kv_heads, head_dim)[slots.cuda()]
        report[f"prepare_qkv {label} {str(dtype)[6:]} (q, k, v, cached k, cached v)"] = [
            relative_error(fused_q, q),
            relative_error(fused_k, k),
            relative_error(fused_v, v),
            relative_error(cached_k, k),
            relative_error(cached_v, v),
        ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {"device": torch.cuda.get_device_name()}
    check_decode_kernel(report)
    check_mixed_step_attention(report)
    time_mixed_step_attention(report)
    check_fused_kernels(report)
    with tempfile.TemporaryDirectory() as root:
        check_greedy_against_transformers(report, Path(root))
        check_graphs_in_idle_gaps(report, Path(root))
        check_async_scheduling(report, Path(root))
    for key, value in report.items():
        print(f"{key:60s} {value}")
    save_report(report, args.out, "gpu_check.json")


if __name__ == "__main__":
    main()

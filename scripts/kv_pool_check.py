"""The worker's KV pool on one GPU (run on an H200, not in CI; torch, triton, transformers):

1. CUDA virtual memory: pages created, mapped into a reserved range, viewed as a torch tensor,
   written and read back, unmapped and mapped elsewhere with their contents;
2. the paged decode kernel, and a CUDA graph of it captured while the cache was small, give the
   reference attention over blocks that a later growth mapped;
3. a small random-weight model (bf16, batch-invariant kernels: a cache's blocks and graphs may
   not change how a token rounds, so any difference is a wrong read): greedy tokens with an
   elastic cache (graphs captured while it is small, grown by a batch, shrunk by another claim,
   grown again, then swapped for a second model in the same pool, whose cache maps the first
   one's pages while its retired range still maps them) equal the tokens of a fixed cache;
4. torch.cuda.mem_get_info shows the pages the pool hands back to the driver;
5. the time to map and unmap N GiB of cache (the Llama-3.1-8B layout: 32 layers, 8 KV heads of
   128, block 16).

    python scripts/kv_pool_check.py [--map-gib 16] [--out DIR]

Prints one JSON object; "ok" is true when every check passed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine import Engine
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.kv_pool import DeviceReservingPages, KVPool
from warmserve.engine.kv_region import KVRegion
from warmserve.layers.attention import attend_one_sequence, gather_kv
from warmserve.layers.triton_attention import paged_decode
from warmserve.testing.checkpoints import ensure_checkpoint

GIB = 2**30
DEVICE = torch.device("cuda:0")
MODEL_SHAPE = {  # Qwen3-0.6B's attention (8 KV heads of 128) in 4 layers: quick to build
    "hidden_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def vmm_basics() -> dict:
    pages = DeviceReservingPages(DEVICE)
    page = pages.page_bytes
    reservation = pages.reserve(8 * page)
    handles = [pages.create() for _ in range(4)]
    reservation.map(0, handles)
    floats = reservation.tensor[: 4 * page].view(torch.float32)
    pattern = torch.arange(floats.numel(), device=DEVICE, dtype=torch.float32)
    floats.copy_(pattern)
    written = bool(torch.equal(floats, pattern))
    # The same physical pages, unmapped and mapped at the upper half: their contents follow.
    torch.cuda.synchronize()
    reservation.unmap(0, 4)
    reservation.map(4 * page, handles)
    moved = bool(torch.equal(reservation.tensor[4 * page :].view(torch.float32), pattern))
    torch.cuda.synchronize()
    reservation.unmap(4 * page, 4)
    for handle in handles:
        pages.release(handle)
    reservation.free()
    return {"page_bytes": page, "write_read": written, "remap_keeps_contents": moved}


def kernel_and_graph_after_growth() -> dict:
    """A decode graph captured over a small cache, replayed over blocks mapped after it."""
    pool = KVPool(DeviceReservingPages(DEVICE), None, min_grow_bytes=0)
    heads, kv_heads, dim, block_size, seqs, blocks_per_seq = 32, 8, 128, 16, 8, 32
    max_blocks = 4096
    region = KVRegion(
        pool,
        num_layers=1,
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=dim,
        dtype=torch.bfloat16,
        max_blocks=max_blocks,
        min_blocks=seqs * blocks_per_seq,
        device=DEVICE,
    )
    region.map_taken_rows()  # a load maps one row at once, the rest in an idle gap
    k_cache, v_cache = region.layer_caches[0]
    before = region.num_blocks
    q = torch.randn(seqs, heads, dim, device=DEVICE, dtype=torch.bfloat16)
    tables = torch.arange(seqs * blocks_per_seq, device=DEVICE).view(seqs, blocks_per_seq)
    context = torch.full((seqs,), blocks_per_seq * block_size - 3, device=DEVICE)
    k_cache[: seqs * blocks_per_seq].normal_()
    v_cache[: seqs * blocks_per_seq].normal_()
    scale = dim**-0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode(q, k_cache, v_cache, tables, context, scale)  # compiles outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = paged_decode(q, k_cache, v_cache, tables, context, scale)
    torch.cuda.current_stream().wait_stream(stream)
    grown = region.grow_to(max_blocks)
    # The sequences now sit in the blocks the growth mapped, at the top of the range.
    high = torch.arange(grown - seqs * blocks_per_seq, grown, device=DEVICE)
    tables.copy_(high.view(seqs, blocks_per_seq))
    for cache in (k_cache, v_cache):
        cache.index_copy_(0, high, torch.randn_like(cache[high]))
    graph.replay()
    direct = paged_decode(q, k_cache, v_cache, tables, context, scale)
    errors = []
    for row in range(seqs):
        length = int(context[row])
        keys = gather_kv(k_cache, tables[row], length).float()
        values = gather_kv(v_cache, tables[row], length).float()
        reference = attend_one_sequence(q[row : row + 1].float(), keys, values, scale)
        errors.append((out[row] - reference[0]).abs().max().item())
        errors.append((direct[row] - reference[0]).abs().max().item())
    del graph
    region.release()
    pool.release_all_idle()
    return {"blocks_before": before, "blocks_after": grown, "max_abs_error": max(errors)}


def greedy_through_grow_shrink_swap(root: Path) -> dict:
    checkpoint = ensure_checkpoint(root / "model", "qwen3", MODEL_SHAPE, dtype="bfloat16")

    def prompts(workload_index: int, count: int, first: int) -> list[list[int]]:
        # Every prompt of every workload is distinct: no prefix-cache hit anywhere, so a cache
        # that shrank (and dropped its cached prefixes) computes exactly what a fixed one does.
        base = 1000 * workload_index + first
        return [[(base + 7 * i + j) % 4000 + 3 for j in range(40 + 37 * i)] for i in range(count)]

    def run(engine: Engine, batch: list[list[int]], tag: str) -> list[list[int]]:
        for index, prompt in enumerate(batch):
            engine.add_request(f"{tag}{index}", prompt, GREEDY)
        out: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                out.setdefault(output.request_id, []).append(output.token_id)
        return [out[f"{tag}{index}"] for index in range(len(batch))]

    def workload(engine: Engine, index: int) -> list[list[list[int]]]:
        # One request first (its decode graphs are captured over the smallest cache), then a
        # batch that makes the cache grow, then one request again (graphs replayed after it).
        tag = f"w{index}-"
        return [
            run(engine, prompts(index, 1, 0), tag + "a"),
            run(engine, prompts(index, 24, 100), tag + "b"),
            run(engine, prompts(index, 1, 500), tag + "c"),
        ]

    fixed = engine_from_checkpoint(
        checkpoint,
        device=DEVICE,
        dtype="bfloat16",
        engine_config=EngineConfig(max_num_seqs=32, kv_cache_bytes=4 * GIB, batch_invariant=True),
    )
    expected = [workload(fixed, index) for index in range(3)]
    fixed.close()

    pool = KVPool(DeviceReservingPages(DEVICE), 16 * GIB, min_grow_bytes=8 * 2**20)
    created = [0]
    create = pool.pages.create

    def counting_create():
        created[0] += 1
        return create()

    pool.pages.create = counting_create
    elastic = EngineConfig(max_num_seqs=32, min_kv_tokens=16, batch_invariant=True)

    def load(owner: str) -> Engine:
        return engine_from_checkpoint(
            checkpoint,
            device=DEVICE,
            dtype="bfloat16",
            engine_config=elastic,
            memory_budget_bytes=pool.usable_bytes,
            kv_pool=pool,
            kv_owner=owner,
        )

    first = load("first")
    region = first.kv_region
    grows = [0]
    grow = region.grow

    def counting_grow(missing: int) -> int:
        grows[0] += 1
        return grow(missing)

    first.scheduler.block_manager.grow = counting_grow
    mapped_at_load = region.mapped_bytes
    grown_run = workload(first, 0)
    mapped_grown = region.mapped_bytes
    # Another claim takes all but the model's minimum: the cache shrinks to it.
    squeeze = pool.usable_bytes - first.fixed_bytes - region.min_bytes
    squeezed = pool.claim("squeeze", squeeze)
    mapped_shrunk = region.mapped_bytes
    pool.drop_claim("squeeze")
    regrown_run = workload(first, 1)
    pages_before_swap = created[0]
    first.close()
    second = load("second")
    swapped_run = workload(second, 2)
    swap_new_pages = created[0] - pages_before_swap
    second.close()

    free_before = torch.cuda.mem_get_info(DEVICE)[0]
    idle_bytes = len(pool.idle) * pool.page_bytes
    pool.release_all_idle()
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info(DEVICE)[0]
    return {
        "equal_grown": grown_run == expected[0],
        "equal_after_shrink_and_regrow": regrown_run == expected[1],
        "equal_after_swap": swapped_run == expected[2],
        "grow_calls": grows[0],
        "mapped_mib": {
            "at_load": mapped_at_load / 2**20,
            "grown": mapped_grown / 2**20,
            "shrunk": mapped_shrunk / 2**20,
        },
        "squeeze_claim_granted": squeezed,
        "pages_created_by_swap": swap_new_pages,
        "driver_release": {
            "idle_mib": idle_bytes / 2**20,
            "mem_get_info_gain_mib": (free_after - free_before) / 2**20,
        },
    }


def map_timing(gib: float) -> dict:
    pool = KVPool(DeviceReservingPages(DEVICE), None, min_grow_bytes=0)
    block_bytes = 2 * 32 * 16 * 8 * 128 * 2
    max_blocks = int(gib * GIB) // block_bytes
    free_start = torch.cuda.mem_get_info(DEVICE)[0]
    started = time.perf_counter()
    region = KVRegion(
        pool,
        num_layers=32,
        block_size=16,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_blocks=max_blocks,
        min_blocks=1,
        device=DEVICE,
    )
    reserved = time.perf_counter()
    region.grow_to(max_blocks)
    torch.cuda.synchronize()
    mapped = time.perf_counter()
    region.layer_caches[-1][1][max_blocks - 1].fill_(1.0)  # the last block is usable
    torch.cuda.synchronize()
    free_mapped = torch.cuda.mem_get_info(DEVICE)[0]
    unmap_started = time.perf_counter()
    region.shrink_rows(0)
    unmapped = time.perf_counter()
    region.grow_to(max_blocks)  # remapping the pool's idle pages: no driver allocation
    remapped = time.perf_counter()
    region.release()  # the pages go back to the pool; the range stays mapped (retired)
    released_region = time.perf_counter()
    pool.finish_retired()  # what the worker's next idle gap does
    unmapped_all = time.perf_counter()
    pool.release_all_idle()
    torch.cuda.synchronize()
    released = time.perf_counter()
    free_end = torch.cuda.mem_get_info(DEVICE)[0]
    return {
        "gib": gib,
        "reserve_ms": (reserved - started) * 1e3,
        "map_new_pages_ms": (mapped - reserved) * 1e3,
        "unmap_ms": (unmapped - unmap_started) * 1e3,
        "remap_idle_pages_ms": (remapped - unmapped) * 1e3,
        "release_region_ms": (released_region - remapped) * 1e3,
        "unmap_all_ms": (unmapped_all - released_region) * 1e3,
        "release_to_driver_ms": (released - unmapped_all) * 1e3,
        "driver_free_drop_gib": (free_start - free_mapped) / GIB,
        "driver_free_back_gib": (free_end - free_mapped) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--map-gib", type=float, default=16.0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint")
    args = parser.parse_args()
    torch.cuda.set_device(DEVICE)
    torch.cuda.init()
    result: dict = {"device": torch.cuda.get_device_name(DEVICE)}
    result["vmm"] = vmm_basics()
    result["decode_after_growth"] = kernel_and_graph_after_growth()
    with tempfile.TemporaryDirectory(dir=args.out) as root:
        result["greedy"] = greedy_through_grow_shrink_swap(Path(root))
    result["map_timing"] = map_timing(args.map_gib)
    greedy, timing = result["greedy"], result["map_timing"]
    result["ok"] = bool(
        result["vmm"]["write_read"]
        and result["vmm"]["remap_keeps_contents"]
        and result["decode_after_growth"]["max_abs_error"] < 2e-2
        and greedy["equal_grown"]
        and greedy["equal_after_shrink_and_regrow"]
        and greedy["equal_after_swap"]
        and greedy["grow_calls"] > 0
        and greedy["mapped_mib"]["shrunk"] < greedy["mapped_mib"]["grown"]
        and greedy["pages_created_by_swap"] == 0
        and greedy["driver_release"]["mem_get_info_gain_mib"]
        >= 0.9 * greedy["driver_release"]["idle_mib"]
        and timing["driver_free_drop_gib"] >= 0.9 * timing["gib"]
        and timing["driver_free_back_gib"] >= 0.9 * timing["gib"]
    )
    print(json.dumps(result, indent=None, default=float))


if __name__ == "__main__":
    main()

"""The worker's KV pool on CPU (page accounting over lazily committed memory): caches that grow
as their model needs blocks and shrink when another model needs the memory, several models
sharing one pool, blocks in use never taken, and greedy outputs equal to transformers through
every growth, shrink and swap."""

from __future__ import annotations

import pytest
from helpers import collect, random_prompts, run_to_completion
from support import hf_greedy

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine import Engine
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.kv_pool import HostPages, InsufficientMemory, KVPool

PAGE = 4096  # the tiny llama's block is 2 KiB per layer's K or V: two blocks to a page
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# Small steps so that growth happens page row by page row, and a small batch budget so that the
# activation reserve (most of a tiny model's footprint) stays small.
ENGINE = EngineConfig(max_num_batched_tokens=256, min_kv_tokens=32)


def make_pool(usable_bytes: int) -> KVPool:
    return KVPool(HostPages(PAGE), usable_bytes, min_grow_bytes=PAGE)


def load(path, pool: KVPool, owner: str) -> Engine:
    engine = engine_from_checkpoint(
        path,
        engine_config=ENGINE,
        max_model_len=256,
        dtype="float32",
        memory_budget_bytes=pool.usable_bytes,
        kv_pool=pool,
        kv_owner=owner,
    )
    # A slot read before it is written shows up as NaN in the outputs.
    for k_cache, v_cache in engine.kv_region.layer_caches:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    return engine


@pytest.fixture(scope="module")
def fixed_bytes(llama_path) -> int:
    """A tiny llama's weights and activation reserve: what it claims outside the pool."""
    engine = load(llama_path, make_pool(2**30), "probe")
    try:
        return engine.fixed_bytes
    finally:
        engine.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts([60, 45, 70, 33, 52, 64, 41, 58], seed=3)


@pytest.fixture(scope="module")
def references(llama_path, prompts) -> list[list[int]]:
    return [hf_greedy(llama_path, prompt, MAX_TOKENS) for prompt in prompts]


def add(engine: Engine, prompts, tag: str) -> None:
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{index}", prompt, GREEDY)


def tokens(completions, tag: str, count: int) -> list[list[int]]:
    return [completions[f"{tag}{index}"].token_ids for index in range(count)]


def test_a_lone_model_grows_past_the_old_fixed_cap_without_preempting(
    llama_path, fixed_bytes, prompts, references
):
    kv_room = 2 * 2**20
    pool = make_pool(fixed_bytes + kv_room)
    # The fixed cap was 8 GiB of a 141 GB GPU's memory; scaled to this pool's memory:
    old_cap = (fixed_bytes + kv_room) * 8 * 2**30 // (141 * 10**9)
    engine = load(llama_path, pool, "lone")
    region = engine.kv_region
    start = region.mapped_bytes
    assert start == region.min_bytes < old_cap

    add(engine, prompts, "r")
    completions = run_to_completion(engine)

    assert tokens(completions, "r", len(prompts)) == references
    assert engine.scheduler.num_preemptions == 0
    assert region.mapped_bytes > old_cap
    assert pool.mapped_pages * PAGE == region.mapped_bytes <= kv_room
    engine.close()
    assert pool.mapped_pages == 0 and len(pool.idle) > 0  # back in the pool, not the driver


def test_two_models_share_the_pool_and_a_swap_maps_the_pages_the_unload_returned(
    llama_path, fixed_bytes, prompts, references
):
    pool = make_pool(2 * fixed_bytes + 2**20)
    first = load(llama_path, pool, "first")
    second = load(llama_path, pool, "second")
    add(first, prompts[:4], "a")
    add(second, prompts[4:], "b")
    done_first, done_second = {}, {}
    while first.has_unfinished_requests() or second.has_unfinished_requests():
        for engine, done in ((first, done_first), (second, done_second)):
            if engine.has_unfinished_requests():
                collect(done, engine.step())
    assert tokens(done_first, "a", 4) == references[:4]
    assert tokens(done_second, "b", 4) == references[4:]
    assert first.kv_region.mapped_bytes > first.kv_region.min_bytes
    assert second.kv_region.mapped_bytes > second.kv_region.min_bytes

    created = pool.pages.created
    first.close()
    third = load(llama_path, pool, "third")
    add(third, prompts[:4], "c")
    assert tokens(run_to_completion(third), "c", 4) == references[:4]
    assert pool.pages.created == created  # the swap took no page from the driver
    for engine in (second, third):
        engine.close()


def test_a_load_takes_an_idle_models_unused_blocks_and_the_pool_stays_within_its_limit(
    llama_path, fixed_bytes, prompts, references
):
    kv_room = 256 * 1024  # less than the batch below needs
    pool = make_pool(2 * fixed_bytes + kv_room)
    idle = load(llama_path, pool, "idle")
    add(idle, prompts, "r")
    assert tokens(run_to_completion(idle), "r", len(prompts)) == references
    grown = idle.kv_region.mapped_bytes
    assert grown > kv_room  # it took memory that the next model's weights need

    newcomer = load(llama_path, pool, "new")  # its claim needs the idle model's pages
    assert idle.kv_region.mapped_bytes < grown
    assert pool.total_pages <= pool.limit_pages
    # Its cached prefixes went with the pages: the blocks left still answer correctly.
    add(idle, prompts[:2], "again")
    add(newcomer, prompts[2:5], "n")
    assert tokens(run_to_completion(idle), "again", 2) == references[:2]
    assert tokens(run_to_completion(newcomer), "n", 3) == references[2:5]
    for engine in (idle, newcomer):
        engine.close()


def test_blocks_that_sequences_hold_are_never_taken(llama_path, fixed_bytes, prompts, references):
    pool = make_pool(fixed_bytes + 2**20)
    busy = load(llama_path, pool, "busy")
    add(busy, prompts, "r")
    completions = {}
    for _ in range(2):  # prompts prefilled: their blocks are held
        collect(completions, busy.step())
    held = busy.scheduler.block_manager.blocks_in_use_end() * busy.kv_region.block_bytes

    # Another model's claim that only the held blocks could satisfy is refused...
    assert not pool.claim("greedy", pool.usable_bytes - fixed_bytes - held // 2)
    pool.drop_claim("greedy")
    with pytest.raises(InsufficientMemory):
        load(llama_path, pool, "late")
    assert list(pool.claims) == ["busy"]  # the failed load left nothing behind
    # ...and the busy model's sequences carry on with their caches intact.
    assert busy.kv_region.num_blocks >= busy.scheduler.block_manager.blocks_in_use_end()
    run_to_completion(busy, completions)
    assert tokens(completions, "r", len(prompts)) == references
    busy.close()


def test_three_models_grow_and_shrink_in_turn_and_answer_correctly(
    llama_path, fixed_bytes, prompts, references
):
    pool = make_pool(3 * fixed_bytes + 2**20)
    engines = [load(llama_path, pool, f"m{index}") for index in range(3)]
    for round_index in range(3):
        # Each round one model takes a big batch: it grows, taking the others' unused tails
        # when the pool runs short.
        engine = engines[round_index]
        add(engine, prompts, f"round{round_index}-")
        done = run_to_completion(engine)
        assert tokens(done, f"round{round_index}-", len(prompts)) == references
        assert sum(e.kv_region.mapped_bytes for e in engines) == pool.mapped_pages * PAGE
        assert pool.total_pages <= pool.limit_pages
    for engine in engines:
        assert engine.kv_region.mapped_bytes >= engine.kv_region.min_bytes
        engine.close()
    assert pool.mapped_pages == 0 and pool.regions == []


def test_a_claim_releases_idle_pages_first(llama_path, fixed_bytes, prompts):
    pool = make_pool(fixed_bytes + 2**20)
    engine = load(llama_path, pool, "gone")
    add(engine, prompts, "r")
    run_to_completion(engine)
    engine.close()
    idle = len(pool.idle)
    assert idle > 0 and pool.claim("weights", pool.usable_bytes - 4 * PAGE)
    assert len(pool.idle) == 4  # the rest went back to the driver


def test_a_load_takes_its_minimum_but_maps_one_row_and_the_rest_in_an_idle_gap(
    llama_path, fixed_bytes, prompts, references
):
    """Mapping is the driver's slow part (a swap's first token would wait for it): a load takes
    the pages of the cache it always keeps (no other model can have them) and maps the first
    row; the cache grows into the rest, or an idle gap maps them."""
    pool = make_pool(fixed_bytes + 2**20)
    engine = load(llama_path, pool, "m")
    region = engine.kv_region
    assert region.data_rows == 1 and region.unmapped_rows
    assert pool.mapped_pages * PAGE == region.mapped_bytes == region.min_bytes
    assert not engine.settled and engine.has_idle_work()
    engine.do_idle_work()
    assert not region.unmapped_rows and region.data_rows == len(region.row_pages) > 1
    assert engine.scheduler.block_manager.num_blocks == region.num_blocks
    assert pool.mapped_pages * PAGE == region.min_bytes  # mapping took nothing more
    add(engine, prompts, "r")
    assert tokens(run_to_completion(engine), "r", len(prompts)) == references
    engine.close()
    unmapped = load(llama_path, pool, "n")  # closed before its idle gap: every page goes back
    unmapped.close()
    assert pool.mapped_pages == 0

"""The block manager alone: allocation, reference counts, prefix sharing, slot appends."""

from __future__ import annotations

import pytest

from warmserve.config import SamplingParams
from warmserve.engine.block_manager import BlockManager
from warmserve.engine.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(token_ids: list[int], request_id: str = "seq") -> Sequence:
    return Sequence(request_id, token_ids, SamplingParams())


def computed(manager: BlockManager, seq: Sequence) -> None:
    """What a step does for the block manager: all tokens are in the cache, full blocks hashed."""
    seq.num_computed_tokens = len(seq)
    manager.register_full_blocks(seq)


def ref_counts(manager: BlockManager, seq: Sequence) -> list[int]:
    return [manager.blocks[block].ref_count for block in seq.block_table]


def test_allocate_takes_one_block_per_started_block_size_and_free_returns_them():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(10)))
    assert manager.can_allocate(seq)
    manager.allocate(seq)

    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert manager.num_free_blocks == 5
    assert ref_counts(manager, seq) == [1, 1, 1]
    assert seq.num_computed_tokens == 0

    held = list(seq.block_table)
    manager.free(seq)
    assert manager.num_free_blocks == 8
    assert seq.block_table == []
    assert [manager.blocks[block].ref_count for block in held] == [0, 0, 0]


def test_allocation_is_refused_when_blocks_run_short():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    assert manager.can_allocate(make_seq(list(range(8))))
    assert not manager.can_allocate(make_seq(list(range(9))))


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0)])
def test_an_empty_cache_is_rejected(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_sequences_with_the_same_full_prefix_blocks_share_them():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "first")
    manager.allocate(first)
    computed(manager, first)

    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42], "second")
    manager.allocate(second)

    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert ref_counts(manager, first) == [2, 2, 1]
    assert ref_counts(manager, second) == [2, 2, 1]
    assert second.num_computed_tokens == 8
    assert manager.num_free_blocks == 8 - 4

    manager.free(first)
    assert ref_counts(manager, second) == [1, 1, 1]
    assert manager.num_free_blocks == 8 - 3


def test_a_fully_cached_prompt_still_recomputes_its_last_token():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq(list(range(1, 9)), "first")
    manager.allocate(first)
    computed(manager, first)

    second = make_seq(list(range(1, 9)), "second")
    manager.allocate(second)
    assert second.block_table == first.block_table
    # The step needs the last token's logits.
    assert second.num_computed_tokens == 7


def test_equal_blocks_after_different_prefixes_are_not_shared():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "first")
    manager.allocate(first)
    computed(manager, first)

    second = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "second")
    manager.allocate(second)
    assert not set(second.block_table) & set(first.block_table)
    assert second.num_computed_tokens == 0


def test_a_freed_block_is_found_again_by_its_hash_until_it_is_reused():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first")
    manager.allocate(first)
    computed(manager, first)
    cached = first.block_table[:2]
    manager.free(first)
    assert manager.num_free_blocks == 4

    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 100, 101], "again")
    manager.allocate(again)
    assert again.block_table[:2] == cached
    assert again.num_computed_tokens == 8
    assert manager.num_free_blocks == 1
    manager.free(again)

    # Free blocks are reused oldest-freed first; a prompt that needs them all overwrites the
    # cached ones, which then no longer match.
    other = make_seq(list(range(50, 66)), "other")
    manager.allocate(other)
    computed(manager, other)
    manager.free(other)
    late = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "late")
    manager.allocate(late)
    assert late.num_computed_tokens == 0


def test_without_prefix_caching_nothing_is_shared():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_seq(list(range(1, 10)), "first")
    manager.allocate(first)
    computed(manager, first)
    second = make_seq(list(range(1, 10)), "second")
    manager.allocate(second)
    assert not set(second.block_table) & set(first.block_table)
    assert second.num_computed_tokens == 0


def test_appending_needs_a_new_block_only_past_a_block_boundary():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4])
    manager.allocate(seq)
    computed(manager, seq)
    assert len(seq.block_table) == 1

    # Fifth token: a second block.
    seq.token_ids.append(5)
    assert manager.can_append(seq)
    manager.append_slots(seq)
    assert len(seq.block_table) == 2
    assert manager.num_free_blocks == 0

    # Sixth to eighth: the same block, even with nothing free.
    for token in (6, 7, 8):
        computed(manager, seq)
        seq.token_ids.append(token)
        assert manager.can_append(seq)
        manager.append_slots(seq)
        assert len(seq.block_table) == 2

    # Ninth: a third block, and none is left.
    computed(manager, seq)
    seq.token_ids.append(9)
    assert not manager.can_append(seq)


def test_register_full_blocks_hashes_each_block_once_with_its_prefix():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4, 5, 6])
    manager.allocate(seq)
    computed(manager, seq)
    assert seq.num_hashed_blocks == 1
    first_hash = manager.blocks[seq.block_table[0]].hash

    seq.token_ids += [7, 8]
    computed(manager, seq)
    assert seq.num_hashed_blocks == 2
    assert manager.blocks[seq.block_table[0]].hash == first_hash
    assert manager.blocks[seq.block_table[1]].token_ids == (5, 6, 7, 8)
    assert set(manager.hash_to_block.values()) == set(seq.block_table)


def test_the_lowest_free_block_is_handed_out_first():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    seqs = [make_seq(list(range(4)), f"s{index}") for index in range(4)]
    for seq in seqs:
        manager.allocate(seq)
    assert [seq.block_table for seq in seqs] == [[0], [1], [2], [3]]
    manager.free(seqs[2])
    manager.free(seqs[0])
    again = make_seq(list(range(8)), "again")
    manager.allocate(again)
    assert again.block_table == [0, 2]
    assert manager.blocks_in_use_end() == 4


def test_a_cache_asks_to_grow_before_it_refuses():
    asked = []

    def grow(missing: int) -> int:
        asked.append(missing)
        return 2 + missing + 1  # one block more than asked

    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE, grow=grow)
    seq = make_seq(list(range(16)))
    assert manager.can_allocate(seq)
    assert asked == [2] and manager.num_blocks == 5
    manager.allocate(seq)
    assert manager.num_free_blocks == 1


def test_shrinking_drops_the_free_tail_and_its_cached_prefixes_but_never_a_held_block():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    held = make_seq(list(range(20, 28)), "held")
    kept = make_seq(list(range(1, 9)), "kept")
    dropped = make_seq(list(range(40, 48)), "dropped")
    for seq in (held, kept, dropped):
        manager.allocate(seq)
        computed(manager, seq)
    manager.free(kept)  # blocks 2 and 3, cached
    manager.free(dropped)  # blocks 4 and 5, cached
    with pytest.raises(ValueError):
        manager.shrink(1)
    manager.shrink(4)
    assert manager.num_blocks == 4 and manager.num_free_blocks == 2
    assert sorted(manager.hash_to_block.values()) == [0, 1, 2, 3]
    again = make_seq(list(range(1, 9)), "again")
    manager.allocate(again)
    assert again.num_computed_tokens == 7 and again.block_table == [2, 3]
    manager.free(again)
    gone = make_seq(list(range(40, 48)), "gone")
    manager.allocate(gone)
    assert gone.num_computed_tokens == 0


def test_a_cache_grows_again_after_it_shrank():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE, grow=lambda missing: 6)
    manager.shrink(1)
    seq = make_seq(list(range(12)))
    assert manager.can_allocate(seq) and manager.num_blocks == 6
    manager.allocate(seq)
    assert seq.block_table == [0, 1, 2]

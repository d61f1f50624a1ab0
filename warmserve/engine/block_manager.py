"""KV cache blocks: allocation, freeing, reference counts, prefix sharing, and a block count
that grows and shrinks with the model's share of the worker's KV pool.

Pure Python: the block manager decides which cache slots a sequence owns; the model runner is
the only code that touches the cache tensors. A full block is identified by the hash of its
tokens and of every token before it, so two sequences with the same prefix share blocks (the
reference count says how many sequences hold a block), and a freed block keeps its contents
until it is reused, so a later request with the same prefix still finds it.

The lowest free block id is always handed out first, so the blocks in use gather at the start
of the cache and its tail frees up: the tail is what the cache gives back when it shrinks.
When blocks run short, the manager asks its `grow` callback for more (the KV region maps pages
from the worker's pool) before it says no.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from warmserve.engine.sequence import Sequence

NO_HASH = -1
# With `scratch_block`, block 0 is never handed out: padded rows of a CUDA-graph batch write into
# it, and it lies in the first page row, which the cache always keeps.
SCRATCH_BLOCK = 0


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = NO_HASH
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prefix_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    return hash((prefix_hash, tuple(token_ids)))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        grow: Callable[[int], int] | None = None,
        scratch_block: bool = False,
    ):
        """`grow(blocks_missing)` asks for at least that many more blocks and returns the new
        block count (the old one when none could be had)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = num_blocks
        self.grow = grow
        # Blocks come into being when first handed out (a load builds no thousands of objects):
        # ids from len(self.blocks) on were never used; freed ids below it wait in a heap (the
        # set says which heap entries are live: a cache hit takes a block out of the middle).
        self.blocks: list[Block] = []
        self.freed_heap: list[int] = []
        self.freed: set[int] = set()
        self.hash_to_block: dict[int, int] = {}
        self.num_scratch_blocks = 0
        if scratch_block:  # held for good, by no sequence
            self._take_free_block()
            self.num_scratch_blocks = 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.freed) + self.num_blocks - len(self.blocks)

    @property
    def num_used_blocks(self) -> int:
        """Blocks that sequences hold."""
        return len(self.blocks) - len(self.freed) - self.num_scratch_blocks

    def ensure_free(self, count: int) -> bool:
        """Whether `count` blocks are free, growing the cache first if they are not."""
        missing = count - self.num_free_blocks
        if missing > 0 and self.grow is not None:
            self.num_blocks = max(self.num_blocks, self.grow(missing))
        return self.num_free_blocks >= count

    def add_blocks(self, num_blocks: int) -> None:
        """The cache has `num_blocks` blocks now: more were mapped outside `grow`."""
        self.num_blocks = max(self.num_blocks, num_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.ensure_free(seq.num_blocks(self.block_size))

    def allocate(self, seq: Sequence) -> None:
        """Gives a waiting sequence blocks for all its tokens, reusing cached full blocks of its
        prefix; sets `seq.num_computed_tokens` to the tokens found in the cache."""
        assert not seq.block_table, "sequence already holds blocks"
        prefix_hash = NO_HASH
        # A prompt that is scored token by token (prompt log-probabilities) is computed whole.
        cache_hit = self.enable_prefix_caching and seq.params.prompt_logprobs is None
        computed = 0
        for index in range(seq.num_blocks(self.block_size)):
            tokens = seq.block_tokens(index, self.block_size)
            full = len(tokens) == self.block_size
            prefix_hash = chain_hash(prefix_hash, tokens) if full else NO_HASH
            block_id = self.hash_to_block.get(prefix_hash, NO_HASH) if cache_hit else NO_HASH
            if block_id == NO_HASH or self.blocks[block_id].token_ids != tuple(tokens):
                cache_hit = False
                block = self._take_free_block()
            else:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    self.freed.discard(block_id)
                block.ref_count += 1
                computed += self.block_size
            seq.block_table.append(block.block_id)
        # The last token is always recomputed: its logits are what the step is for.
        seq.num_computed_tokens = min(computed, len(seq) - 1)

    def _take_free_block(self) -> Block:
        block_id = self._pop_lowest_freed()
        if block_id is None:
            block_id = len(self.blocks)
            assert block_id < self.num_blocks, "no free block"
            self.blocks.append(Block(block_id))
        block = self.blocks[block_id]
        self._forget_hash(block)
        block.hash, block.token_ids, block.ref_count = NO_HASH, (), 1
        return block

    def _pop_lowest_freed(self) -> int | None:
        while self.freed_heap:
            block_id = heapq.heappop(self.freed_heap)
            if block_id in self.freed:
                self.freed.discard(block_id)
                return block_id
        return None

    def _forget_hash(self, block: Block) -> None:
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.freed.add(block_id)
                heapq.heappush(self.freed_heap, block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = NO_HASH
        if len(self.freed_heap) > 2 * len(self.freed) + 64:  # drop the cache hits' stale entries
            self.freed_heap = sorted(self.freed)

    def can_append(self, seq: Sequence) -> bool:
        return self.ensure_free(self._blocks_missing(seq))

    def append_slots(self, seq: Sequence) -> None:
        """Makes sure every token of a running sequence has a slot (a decode adds one token)."""
        for _ in range(self._blocks_missing(seq)):
            seq.block_table.append(self._take_free_block().block_id)

    def _blocks_missing(self, seq: Sequence) -> int:
        return max(0, seq.num_blocks(self.block_size) - len(seq.block_table))

    def blocks_in_use_end(self) -> int:
        """One past the highest block a sequence holds: the cache cannot shrink below it."""
        for block in reversed(self.blocks):
            if block.ref_count > 0:
                return block.block_id + 1
        return 0

    def shrink(self, num_blocks: int) -> None:
        """Drops the blocks from `num_blocks` on (free ones only; cached prefixes among them
        are forgotten)."""
        if num_blocks < self.blocks_in_use_end():
            raise ValueError(f"blocks from {num_blocks} on are in use")
        for block in self.blocks[num_blocks:]:
            self._forget_hash(block)
            self.freed.discard(block.block_id)
        del self.blocks[num_blocks:]
        self.freed_heap = sorted(self.freed)
        self.num_blocks = num_blocks

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step, makes the sequence's newly filled blocks findable by their prefix."""
        if not self.enable_prefix_caching:
            return
        full_blocks = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_hashed_blocks, full_blocks):
            block = self.blocks[seq.block_table[index]]
            if block.hash == NO_HASH:
                tokens = seq.block_tokens(index, self.block_size)
                block.hash = chain_hash(seq.last_block_hash, tokens)
                block.token_ids = tuple(tokens)
                self.hash_to_block.setdefault(block.hash, block.block_id)
            seq.last_block_hash = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full_blocks)

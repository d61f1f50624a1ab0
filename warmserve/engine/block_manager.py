"""Fixed-size KV cache blocks: allocation, freeing, reference counts and prefix sharing.

Pure Python: the block manager decides which cache slots a sequence owns; the model runner is
the only code that touches the cache tensors. A full block is identified by the hash of its
tokens and of every token before it, so two sequences with the same prefix share blocks (the
reference count says how many sequences hold a block), and a freed block keeps its contents
until it is reused, so a later request with the same prefix still finds it.
"""

from __future__ import annotations

from collections import deque

from warmserve.engine.sequence import Sequence

NO_HASH = -1


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
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = num_blocks
        # Blocks come into being when first handed out (a load builds no thousands of objects):
        # the free list gives never-used ids in increasing order, after every freed one.
        self.blocks: list[Block] = []
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks(self.block_size)

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
                    self.free_block_ids.remove(block_id)
                block.ref_count += 1
                computed += self.block_size
            seq.block_table.append(block.block_id)
        # The last token is always recomputed: its logits are what the step is for.
        seq.num_computed_tokens = min(computed, len(seq) - 1)

    def _take_free_block(self) -> Block:
        block_id = self.free_block_ids.popleft()
        if block_id == len(self.blocks):
            self.blocks.append(Block(block_id))
        block = self.blocks[block_id]
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = NO_HASH, (), 1
        return block

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = NO_HASH

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self._blocks_missing(seq)

    def append_slots(self, seq: Sequence) -> None:
        """Makes sure every token of a running sequence has a slot (a decode adds one token)."""
        for _ in range(self._blocks_missing(seq)):
            seq.block_table.append(self._take_free_block().block_id)

    def _blocks_missing(self, seq: Sequence) -> int:
        return max(0, seq.num_blocks(self.block_size) - len(seq.block_table))

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

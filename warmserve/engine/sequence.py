"""A request as the scheduler sees it: tokens so far, where its KV lives, whether it is done."""

from __future__ import annotations

import enum
import itertools

from warmserve.config import SamplingParams

_arrival = itertools.count()
# The token of a step launched but not resolved yet (see engine/scheduler.py): never a real id.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose keys and values are in the cache (prefix-cache hits included).
        self.num_computed_tokens = 0
        # Tokens the current step computes: all of num_new_tokens, or a chunk of a long prompt.
        self.num_scheduled_tokens = 0
        # Prefix-cache bookkeeping of the block manager: blocks already hashed, and the last hash.
        self.num_hashed_blocks = 0
        self.last_block_hash = -1
        self.finish_reason: str | None = None
        # Set when the request's grammar (structured output) has ended: the sequence stops.
        self.grammar_done = False
        self.arrival = next(_arrival)
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_new_tokens(self) -> int:
        """Tokens not yet through the model (a decode's one, or what is left of a prompt)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def samples_this_step(self) -> bool:
        """Whether the current step reaches the sequence's last token (and so samples the next);
        a chunk of a prompt that is not the last one only fills the KV cache."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self.token_ids)

    def num_blocks(self, block_size: int) -> int:
        return -(-len(self.token_ids) // block_size)

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size : (index + 1) * block_size]

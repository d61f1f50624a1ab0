"""Continuous batching: every step runs the running sequences' next tokens and admits waiting
prompts into the same batch while the token and sequence budgets allow. Decodes go first; a
prompt longer than what is left of the step's token budget is prefilled in chunks over several
steps (chunked prefill), so that no step runs more than `max_num_batched_tokens` tokens and a
long prompt never holds the running streams (or the other models of the worker) back for long.
A step that decodes carries at most `prompt_budget` prompt tokens (the engine sets it from the
step times it measures, engine/prompt_budget.py): every running stream waits for that step, so
its prompt share is kept small. A prompt whose tokens are scored (prompt log-probabilities) is
computed whole.

A step is committed when it is launched (its tokens count as computed, and each sequence it
samples for holds a placeholder for the token to come) and resolved once its tokens are known.
Resolved at once, that is the classic loop; with asynchronous scheduling the engine schedules
and launches the next step before it resolves this one, so a running sequence has at most one
placeholder when it is scheduled (the next step's input comes from the device).

Pure Python. When the KV cache runs out of free blocks, the block manager first asks for more
(the cache grows in the worker's KV pool); only when it cannot grow is the newest running
sequence preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its tokens later (never failed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from warmserve.engine.block_manager import BlockManager
from warmserve.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # The prompt tokens a step that decodes carries at first; None: max_num_batched_tokens.
    prefill_tokens_beside_decodes: int | None = None


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager, eos_token_ids=()):
        self.limits = limits
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_budget = limits.prefill_tokens_beside_decodes or limits.max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences to run this step; each computes `num_scheduled_tokens` tokens from
        num_computed_tokens on."""
        running: list[Sequence] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._last_token_pending(seq):
                continue  # the step in flight samples its last token
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq)
                running.append(seq)
        # Decodes first (one token each), then the chunks of prompts under way.
        running.sort(key=lambda seq: seq.num_new_tokens > 1)
        scheduled: list[Sequence] = []
        budget = self.limits.max_num_batched_tokens
        prompt_budget = budget
        if any(seq.num_new_tokens == 1 for seq in running):  # the step decodes
            prompt_budget = self.prompt_budget
        for seq in running:
            chunk = self._chunk(seq, budget, prompt_budget)
            if chunk:
                seq.num_scheduled_tokens = chunk
                scheduled.append(seq)
                budget -= chunk
                if seq.num_new_tokens > 1:  # a prompt's chunk
                    prompt_budget -= chunk
        if preempted:
            return scheduled
        while self.waiting and len(self.running) < self.limits.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            chunk = self._chunk(seq, budget, prompt_budget)
            if not chunk or not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)  # prefix-cache hits count as computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            # Cached prefix blocks may have shortened what is left to compute.
            seq.num_scheduled_tokens = self._chunk(seq, budget, prompt_budget)
            scheduled.append(seq)
            budget -= seq.num_scheduled_tokens
            prompt_budget -= seq.num_scheduled_tokens
        return scheduled

    @staticmethod
    def _chunk(seq: Sequence, budget: int, prompt_budget: int) -> int:
        """The tokens `seq` may run this step: a decode's one; a prompt's next chunk within
        both budgets; a scored prompt only whole, within the step's budget (held to the
        smaller one, it would wait for as long as any stream decodes)."""
        wanted = seq.num_new_tokens
        if wanted == 1 or not _chunkable(seq):
            return wanted if wanted <= budget else 0
        return max(0, min(wanted, budget, prompt_budget))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def commit(self, scheduled: list[Sequence]) -> list[int | None]:
        """At launch: the scheduled tokens count as computed, and each sequence whose step
        samples gets a placeholder for its token. Returns each one's placeholder index (None for
        a prompt chunk that samples nothing), for resolve."""
        placeholders: list[int | None] = []
        for seq in scheduled:
            samples = seq.samples_this_step
            seq.num_computed_tokens += seq.num_scheduled_tokens
            if samples:
                seq.token_ids.append(PLACEHOLDER)
                placeholders.append(len(seq.token_ids) - 1)
            else:
                placeholders.append(None)
        return placeholders

    def resolve(
        self,
        launched: list[Sequence],
        placeholders: list[int | None],
        new_token_ids: list[int | None],
    ) -> list[Sequence]:
        """Once a committed step's tokens are known: each sampling sequence's placeholder takes
        its token (None for a prompt chunk); returns those that finished (blocks freed). A
        sequence ended meanwhile (aborted, or finished by the step before) is skipped; one
        preempted meanwhile (waiting, to be recomputed) still takes its token."""
        finished = []
        for seq, index, token_id in zip(launched, placeholders, new_token_ids, strict=True):
            if seq.status is SequenceStatus.FINISHED:
                continue
            if index is not None:
                seq.token_ids[index] = token_id
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.register_full_blocks(seq)
            if index is None:
                continue  # a chunk of its prompt: the rest comes in the next steps
            reason = self._finish_reason(seq, token_id, index + 1)
            if reason is not None:
                del seq.token_ids[index + 1 :]  # the next step's placeholder, if it ran
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _last_token_pending(self, seq: Sequence) -> bool:
        """Whether the token the step in flight samples for `seq` is its last one (its
        max_tokens or the context reached): then no further step may run it."""
        return seq.token_ids[-1] == PLACEHOLDER and self._full_length(seq, len(seq))

    def _finish_reason(self, seq: Sequence, token_id: int, length: int) -> str | None:
        """Why `seq` ends with `token_id`, which makes it `length` tokens long (a placeholder
        of a later step may follow it), or None."""
        params = seq.params
        if seq.grammar_done or token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if self._full_length(seq, length):
            return "length"
        return None

    def _full_length(self, seq: Sequence, length: int) -> bool:
        """Whether `seq`, `length` tokens long, has all the tokens it may have: its max_tokens
        generated, or the context full."""
        num_output_tokens = length - seq.num_prompt_tokens
        return num_output_tokens >= seq.params.max_tokens or length >= self.limits.max_model_len

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:  # preempted while its last step was in flight: it holds no blocks
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self._finish(seq, "abort")
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                return seq
        return None


def _chunkable(seq: Sequence) -> bool:
    """A prompt whose every token is scored goes through the model in one step."""
    return seq.params.prompt_logprobs is None

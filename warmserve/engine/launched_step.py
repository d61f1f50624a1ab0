"""A step launched on the device whose sampled tokens the host has not read yet.

With asynchronous scheduling its tokens start for a pinned host buffer as soon as the step is
queued, behind an event, so that the host can read them once this step ends without waiting
for the steps queued after it (reading the device tensor itself would). The next step's inputs
take these tokens on the device (`fill_placeholders`), before the host has seen them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from warmserve.engine.sequence import Sequence
from warmserve.protocol import TokenLogprobs


@dataclass
class LaunchedStep:
    seqs: list[Sequence]
    # One sampled token per sequence whose step reaches its last token, in `seqs`' order.
    tokens: torch.Tensor | None
    # For each sampling sequence, its row in `tokens`.
    rows: dict[str, int] = field(default_factory=dict)
    # Per sampling row, when its request asks for them (only a step resolved at once has them).
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)
    # Each sequence's placeholder index in its token ids (the scheduler's commit), or None.
    placeholders: list[int | None] = field(default_factory=list)
    # What the step ran besides sampling: its prompt tokens and its decodes, and how long it took.
    prompt_tokens: int = 0
    decodes: int = 0
    clock: StepClock | None = None
    _host: torch.Tensor | None = None
    _done: torch.cuda.Event | None = None

    def queued(self, copy_tokens: bool, stream: torch.cuda.Stream | None) -> None:
        """Once everything the step launches is queued on `stream` (None: not on a GPU): marks
        where the step ends, and with `copy_tokens` queues the copy of its tokens to the host
        before that mark."""
        if stream is None:
            return
        if copy_tokens and self.tokens is not None:
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._host.copy_(self.tokens, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(stream)

    def token_ids(self) -> list[int]:
        """The sampled tokens (with the copy queued: waits for this step, not for the steps
        queued after it, as reading the device tensor would)."""
        if self.tokens is None:
            return []
        if self._host is None:
            return self.tokens.tolist()
        self._done.synchronize()
        return self._host.tolist()

    def wait(self) -> None:
        """Returns once the device has run the step (its model's memory may go then)."""
        if self._done is not None:
            self._done.synchronize()


class StepClock:
    """How long a step ran, marked around its launch. On a GPU, between two events: from where
    the device started the step (behind the step before, with asynchronous scheduling) to where
    it ended, so a step's time is the gap its streams see between two tokens either way. On a
    CPU the launch itself computes the step."""

    def __init__(self, stream: torch.cuda.Stream | None):
        """`stream`: the one the step is launched on (None: not on a GPU). Passed rather than
        looked up: torch's lookup of the current stream costs more than recording an event."""
        self.started = time.perf_counter()
        self.ended = self.started
        self.stream = stream
        self._begin = self._end = None
        if stream is not None:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record(stream)

    def stop(self) -> None:
        """Once everything the step launches is queued."""
        if self._begin is None:
            self.ended = time.perf_counter()
        else:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(self.stream)

    def seconds(self) -> float:
        """After the step has ended (its tokens read)."""
        if self._end is None:
            return self.ended - self.started
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1e3


def fill_placeholders(input_ids: torch.Tensor, fill: torch.Tensor | None, previous) -> None:
    """Writes the previous step's sampled tokens into the rows of `input_ids` that wait for them.
    `fill`: [2, n] on the device, the rows of input_ids and the rows of `previous.tokens`."""
    if fill is not None:
        input_ids.index_copy_(0, fill[0], previous.tokens.index_select(0, fill[1]))

"""A step launched on the device whose sampled tokens the host has not read yet.

Its tokens start for a pinned host buffer as soon as the step is queued, behind an event, so
that the host can read them once this step ends without waiting for the steps queued after it
(reading the device tensor itself would). The next step's inputs take these tokens on the
device (`fill_placeholders`), before the host has seen them.
"""

from __future__ import annotations

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
    _host: torch.Tensor | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Queues the copy of the tokens to the host behind everything the step launched."""
        if self.tokens is None or self.tokens.device.type != "cuda":
            return
        self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
        self._host.copy_(self.tokens, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def token_ids(self) -> list[int]:
        """The sampled tokens (waits for this step, not for the steps after it)."""
        if self.tokens is None:
            return []
        if self._copied is None:
            return self.tokens.tolist()
        self._copied.synchronize()
        return self._host.tolist()


def fill_placeholders(input_ids: torch.Tensor, fill: torch.Tensor | None, previous) -> None:
    """Writes the previous step's sampled tokens into the rows of `input_ids` that wait for them.
    `fill`: [2, n] on the device, the rows of input_ids and the rows of `previous.tokens`."""
    if fill is not None:
        input_ids.index_copy_(0, fill[0], previous.tokens.index_select(0, fill[1]))

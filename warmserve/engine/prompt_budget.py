"""How many prompt tokens a step that decodes may carry, from the step times measured so far.

Every running stream waits for a step that also prefills, so its inter-token gap is that step's
time. A fixed budget suits one model size: on an H200, 512 prompt tokens beside 64 decodes made
an 8B-shaped model's step 2.7x its decode step, but a 0.6B-shaped model's only 1.9x, while most
of that small model's time went to such steps (each carrying one prompt). The budget here is at
least the configured one, and more while a step stays within `time_ratio` decode steps: with D
the decode step's time and c the time a prompt token adds, (time_ratio - 1) * D / c tokens
(Sarathi-Serve sizes its chunks from a latency target in the same way, from an offline profile).

D and c are moving averages over the model's own steps (each step's time as its streams see it,
launched_step.StepClock: asynchronous steps included), so the budget follows the batch and the
device. Pure Python.
"""

from __future__ import annotations

SMOOTHING = 0.1  # weight of the newest step in each moving average
# Prompt tokens below which a step's extra time is too small to estimate c from (or the
# configured budget, when that is smaller: its steps must be able to raise it).
MIN_SAMPLE_TOKENS = 32
GRANULE = 16  # budgets are rounded down to whole KV blocks


class PromptBudget:
    def __init__(self, least: int, ceiling: int, time_ratio: float):
        """`least`: the budget until the step times are known, and the smallest; `ceiling`:
        the largest (a step's whole token budget); `time_ratio` 0 keeps `least`."""
        self.least = least
        self.ceiling = ceiling
        self.time_ratio = time_ratio
        self.decode_seconds: float | None = None  # D
        self.token_seconds: float | None = None  # c

    def observe(self, seconds: float, prompt_tokens: int, decodes: int) -> None:
        """One step's time, with the prompt tokens and decodes it ran."""
        if decodes == 0 or self.time_ratio <= 0:
            return  # a prefill-only step says nothing about the streams' gap
        if prompt_tokens == 0:
            self.decode_seconds = _average(self.decode_seconds, seconds)
        elif prompt_tokens >= min(MIN_SAMPLE_TOKENS, self.least) and self.decode_seconds:
            extra = max(seconds - self.decode_seconds, 0.0) / prompt_tokens
            self.token_seconds = _average(self.token_seconds, extra)

    @property
    def tokens(self) -> int:
        if self.time_ratio <= 0 or self.decode_seconds is None or self.token_seconds is None:
            return self.least
        if self.token_seconds <= 0:
            return self.ceiling
        fitting = (self.time_ratio - 1) * self.decode_seconds / self.token_seconds
        budget = int(min(fitting, self.ceiling)) // GRANULE * GRANULE
        return max(self.least, budget)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else current + SMOOTHING * (sample - current)

"""Seeded request lengths and prompts: fixed lengths, and a ShareGPT-like mix.

No dataset is reachable, so the ShareGPT-like mix draws lengths from lognormal distributions
(sigma 1, like the long right tail of chat turns) whose means are those of the ShareGPT V3
conversations as vLLM's benchmark samples them: about 215 prompt and 198 output tokens. Lengths
are clipped to [4, 1024] prompt and [4, 512] output tokens (and to what the model's context
leaves); `scale` shrinks both for the tiny models of a quick run.
"""

from __future__ import annotations

import math
import random

SHAREGPT_MEAN_INPUT, SHAREGPT_MEAN_OUTPUT = 215, 198
SHAREGPT_SIGMA = 1.0
MIN_LEN, MAX_INPUT_LEN, MAX_OUTPUT_LEN = 4, 1024, 512
# Prompt ids avoid the special tokens (0-2) and stay below every benchmark vocabulary.
FIRST_PROMPT_ID, PROMPT_ID_LIMIT = 3, 500


def fixed_lengths(count: int, input_len: int, output_len: int) -> list[tuple[int, int]]:
    return [(input_len, output_len)] * count


def sharegpt_like_lengths(
    count: int, seed: int, max_model_len: int, scale: float = 1.0
) -> list[tuple[int, int]]:
    rng = random.Random(seed)

    def draw(mean: float, upper: int) -> int:
        mu = math.log(mean * scale) - SHAREGPT_SIGMA**2 / 2  # lognormal mean = e^(mu + s^2/2)
        return int(min(max(rng.lognormvariate(mu, SHAREGPT_SIGMA), MIN_LEN), upper * scale))

    lengths = []
    for _ in range(count):
        output_len = draw(SHAREGPT_MEAN_OUTPUT, MAX_OUTPUT_LEN)
        input_len = min(draw(SHAREGPT_MEAN_INPUT, MAX_INPUT_LEN), max_model_len - output_len)
        lengths.append((input_len, output_len))
    return lengths


def random_prompt(rng: random.Random, length: int) -> list[int]:
    """`length` token ids: sent as ids, the prompt has exactly that many tokens."""
    return [rng.randrange(FIRST_PROMPT_ID, PROMPT_ID_LIMIT) for _ in range(length)]

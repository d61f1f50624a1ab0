"""Seeded request lengths and prompts: fixed lengths, and a ShareGPT-like mix.

No dataset is reachable, so the ShareGPT-like mix draws lengths from lognormal distributions
(sigma 1, like the long right tail of chat turns) with means of about 215 prompt and 198 output
tokens, the order of ShareGPT V3's first turns. A draw outside the bounds vLLM's ShareGPT sampler
keeps (at least 4 tokens each, a prompt of at most 1,024, at most 2,048 together, and here
within the model's context) is drawn again, as that sampler skips such conversations; the
lengths kept average about 190 in / 195 out. `scale` shrinks everything for the tiny models of
a quick run.
"""

from __future__ import annotations

import math
import random

SHAREGPT_MEAN_INPUT, SHAREGPT_MEAN_OUTPUT = 215, 198
SHAREGPT_SIGMA = 1.0
MIN_LEN, MAX_INPUT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048
# Prompt ids avoid the special tokens (0-2) and stay below every benchmark vocabulary.
FIRST_PROMPT_ID, PROMPT_ID_LIMIT = 3, 500


def fixed_lengths(count: int, input_len: int, output_len: int) -> list[tuple[int, int]]:
    return [(input_len, output_len)] * count


def sharegpt_like_lengths(
    count: int, seed: int, max_model_len: int, scale: float = 1.0
) -> list[tuple[int, int]]:
    rng = random.Random(seed)

    def draw(mean: float) -> int:
        mu = math.log(mean * scale) - SHAREGPT_SIGMA**2 / 2  # lognormal mean = e^(mu + s^2/2)
        return round(rng.lognormvariate(mu, SHAREGPT_SIGMA))

    total_limit = min(MAX_TOTAL_LEN * scale, max_model_len)
    lengths: list[tuple[int, int]] = []
    while len(lengths) < count:
        input_len, output_len = draw(SHAREGPT_MEAN_INPUT), draw(SHAREGPT_MEAN_OUTPUT)
        if (
            MIN_LEN <= input_len <= MAX_INPUT_LEN * scale
            and output_len >= MIN_LEN
            and input_len + output_len <= total_limit
        ):
            lengths.append((input_len, output_len))
    return lengths


def random_prompt(rng: random.Random, length: int) -> list[int]:
    """`length` token ids: sent as ids, the prompt has exactly that many tokens."""
    return [rng.randrange(FIRST_PROMPT_ID, PROMPT_ID_LIMIT) for _ in range(length)]

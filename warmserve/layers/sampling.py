"""Token sampling: greedy, temperature, top-k, top-p, min-p (in transformers' order), with a
per-request random generator; and the log-probabilities that requests ask for."""

from __future__ import annotations

import torch

from warmserve.config import SamplingParams
from warmserve.layers.host_to_device import to_device


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """logits: [seqs, vocab] float32. Returns one token id per row."""
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return tokens
    rows = to_device(random_rows, logits.device)
    probs = sampling_probs(logits.index_select(0, rows), [params[i] for i in random_rows])
    for row, index in enumerate(random_rows):
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per request.
        noise = torch.empty_like(probs[row]).exponential_(generator=generators[index])
        tokens[index] = (probs[row] / noise).argmax()
    return tokens


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from: temperature, then top-k, top-p and min-p."""
    temperatures = to_device([p.temperature for p in params], logits.device)
    scaled = logits.float() / temperatures.unsqueeze(1)
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        scaled = _top_k(scaled, top_ks)
    probs = scaled.softmax(dim=-1)
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        probs = _top_p(probs, to_device(top_ps, logits.device))
    min_ps = [p.min_p for p in params]
    if any(p > 0.0 for p in min_ps):
        probs = _min_p(probs, to_device(min_ps, logits.device))
    return probs


def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = to_device([k if 0 < k < vocab else vocab for k in top_ks], logits.device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (ks - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps.unsqueeze(1), 0.0)
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def _min_p(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Drops the tokens less likely than min_p times the most likely one (which always stays)."""
    threshold = min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    kept = probs.masked_fill(probs < threshold, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of `logits` (the raw logits, before any processing: vLLM's default
    "raw_logprobs") at each row's token, and the `num_top` largest of each row, in descending
    order: ([rows], [rows, num_top] ids, [rows, num_top] values)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen, top_ids, top_values

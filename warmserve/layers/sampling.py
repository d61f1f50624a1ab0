"""Token sampling: greedy, temperature, top-k, top-p, with a per-request random generator."""

from __future__ import annotations

import torch

from warmserve.config import SamplingParams


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
    rows = torch.tensor(random_rows, device=logits.device)
    temperatures = torch.tensor(
        [params[i].temperature for i in random_rows], device=logits.device
    ).unsqueeze(1)
    scaled = logits.index_select(0, rows).float() / temperatures
    top_ks = [params[i].top_k for i in random_rows]
    if any(k > 0 for k in top_ks):
        scaled = _top_k(scaled, top_ks)
    probs = scaled.softmax(dim=-1)
    top_ps = [params[i].top_p for i in random_rows]
    if any(p < 1.0 for p in top_ps):
        probs = _top_p(probs, torch.tensor(top_ps, device=logits.device))
    for row, index in enumerate(random_rows):
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per request.
        noise = torch.empty_like(probs[row]).exponential_(generator=generators[index])
        tokens[index] = (probs[row] / noise).argmax()
    return tokens


def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (ks - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps.unsqueeze(1), 0.0)
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)

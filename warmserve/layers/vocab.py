"""Vocabulary-parallel token embedding and language-model head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.layers.linear import check_shape, project
from warmserve.layers.parallel import current_group


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary rows (padded to divide evenly)."""

    batch_invariant = False  # set by layers/batch_invariance.py

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.group = current_group()
        self.tp_size, self.tp_rank = self.group.size, self.group.rank
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, dim), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, (self.vocab_size, param.shape[1]))
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.start))
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows_per_rank)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(embedded)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Projects hidden states to the full vocabulary's logits on every rank (tied heads use
        the embedding itself)."""
        logits = project(hidden, self.weight, None, self.batch_invariant)
        if self.tp_size > 1:
            logits = self.group.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]


class ParallelLMHead(VocabParallelEmbedding):
    """An untied output head: the same sharding as the embedding, its own weights."""

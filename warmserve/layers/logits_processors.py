"""Logits processors that run before temperature: logit bias, min_tokens, and the repetition,
frequency and presence penalties, in vLLM's order.

Each one works on the rows that ask for it, batched on the logits' device; a batch in which no
request asks for any of them costs one pass over its parameters and no device work.
Semantics: the repetition penalty is transformers' `RepetitionPenaltyLogitsProcessor` over the
prompt and the output so far (a seen token's logit is divided by the penalty when positive,
multiplied when negative); the frequency and presence penalties are OpenAI's over the output so
far (`logit -= frequency * count + presence * (count > 0)`); min_tokens is transformers'
`MinNewTokensLengthLogitsProcessor` over EOS and the request's stop_token_ids.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch

from warmserve.config import SamplingParams
from warmserve.layers.host_to_device import to_device


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    token_ids: Sequence[list[int]],
    num_prompt_tokens: Sequence[int],
    eos_token_ids: frozenset[int] | set[int] = frozenset(),
) -> torch.Tensor:
    """logits: [seqs, vocab] float32; `token_ids[i]` holds row i's prompt and output so far.
    Returns the processed logits: `logits` itself when nothing applies, a new tensor otherwise."""
    processed = logits
    if any(p.logit_bias for p in params):
        processed = _add_logit_bias(processed.clone(), params)
    if any(p.min_tokens for p in params):
        num_output_tokens = [
            len(ids) - n for ids, n in zip(token_ids, num_prompt_tokens, strict=True)
        ]
        if any(p.min_tokens > done for p, done in zip(params, num_output_tokens, strict=True)):
            if processed is logits:
                processed = logits.clone()
            _mask_early_stops(processed, params, num_output_tokens, eos_token_ids)
    penalized = [row for row, p in enumerate(params) if p.penalized]
    if penalized:
        processed = _apply_penalties(processed, params, token_ids, num_prompt_tokens, penalized)
    return processed


def _add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    rows, token_ids, biases = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias:
            rows.append(row)
            token_ids.append(token_id)
            biases.append(bias)
    index = to_device([rows, token_ids], logits.device)
    values = to_device(biases, logits.device, logits.dtype)
    return logits.index_put_((index[0], index[1]), values, accumulate=True)


def _mask_early_stops(
    logits: torch.Tensor,
    params: list[SamplingParams],
    num_output_tokens: list[int],
    eos_token_ids: frozenset[int] | set[int],
) -> None:
    rows, token_ids = [], []
    for row, (p, done) in enumerate(zip(params, num_output_tokens, strict=True)):
        if p.min_tokens > done:
            # EOS ends a request only when it does not ignore EOS.
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            stops = [token for token in stops if token < logits.shape[-1]]
            rows.extend([row] * len(stops))
            token_ids.extend(stops)
    if token_ids:
        index = to_device([rows, token_ids], logits.device)
        logits[index[0], index[1]] = float("-inf")


def _apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    token_ids: Sequence[list[int]],
    num_prompt_tokens: Sequence[int],
    rows: list[int],
) -> torch.Tensor:
    vocab = logits.shape[-1]
    device = logits.device
    chosen = [params[row] for row in rows]
    outputs = [token_ids[row][num_prompt_tokens[row] :] for row in rows]
    output_counts = _token_counts(outputs, vocab, device)
    penalized = logits.index_select(0, to_device(rows, device))
    repetition = [p.repetition_penalty for p in chosen]
    if any(value != 1.0 for value in repetition):
        prompts = [token_ids[row][: num_prompt_tokens[row]] for row in rows]
        seen = (_token_counts(prompts, vocab, device) + output_counts) > 0
        penalty = to_device(repetition, device, logits.dtype).unsqueeze(1)
        repeated = torch.where(penalized < 0, penalized * penalty, penalized / penalty)
        penalized = torch.where(seen, repeated, penalized)
    frequency = to_device([p.frequency_penalty for p in chosen], device).unsqueeze(1)
    presence = to_device([p.presence_penalty for p in chosen], device).unsqueeze(1)
    penalized = penalized - frequency * output_counts - presence * (output_counts > 0)
    rows_index = to_device(rows, device)
    return logits.index_copy(0, rows_index, penalized.to(logits.dtype))


def _token_counts(sequences: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(sequences), vocab] float: how often each token occurs in each sequence."""
    counts = torch.zeros(len(sequences), vocab, device=device)
    lengths = array.array("q", [len(ids) for ids in sequences])
    if sum(lengths):
        # The lengths and the token ids travel to the device as one tensor, built in an array
        # (a third of the time torch.tensor takes over a list of Python ints).
        flat = array.array("q", lengths)
        for ids in sequences:
            flat.extend(ids)
        flat = to_device(torch.frombuffer(flat, dtype=torch.int64), device)
        lengths_on_device, token_ids = flat[: len(lengths)], flat[len(lengths) :]
        rows = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), lengths_on_device, output_size=len(token_ids)
        )
        counts.index_put_((rows, token_ids), torch.ones_like(token_ids, dtype=counts.dtype), True)
    return counts

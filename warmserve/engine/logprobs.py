"""The log-probabilities requests ask for: of each sampled token, and of each prompt token (for
`echo` with `logprobs`), from the raw logits. Each kind is read back to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from warmserve.config import SamplingParams
from warmserve.engine.sequence import Sequence
from warmserve.layers.sampling import token_logprobs
from warmserve.protocol import TokenLogprobs

# Prompt positions whose logits exist at once: the activation reserve holds the logits of
# max_num_seqs rows (twice), so a long prompt is scored in pieces of this many rows.
PROMPT_LOGITS_CHUNK = 64


def sampled_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Per row, the sampled token's log-probability and the most likely tokens', for the rows
    that ask."""
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    asking = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not asking:
        return logprobs
    num_top = max(params[row].logprobs for row in asking)
    rows = torch.tensor(asking, device=logits.device)
    scored = _unpack(
        token_logprobs(logits.index_select(0, rows), tokens.index_select(0, rows), num_top),
        num_top,
    )
    for row, (logprob, top_ids, top_values) in zip(asking, scored, strict=True):
        wanted = params[row].logprobs
        logprobs[row] = TokenLogprobs(logprob, top_ids[:wanted], top_values[:wanted])
    return logprobs


def wants_prompt_logprobs(seq: Sequence) -> bool:
    """A prompt is scored once, in its first prefill (which prefix caching never shortens for
    such a request); a recomputation after preemption does not score it again."""
    return (
        seq.params.prompt_logprobs is not None
        and seq.num_output_tokens == 0
        and seq.num_computed_tokens == 0
    )


def prompt_rows(seqs: list[Sequence], query_lens: list[int]) -> list[int]:
    """Rows of the step's flattened tokens whose logits predict a prompt token: every prompt
    position but the last, of each sequence that wants its prompt scored."""
    rows: list[int] = []
    offset = 0
    for seq, query_len in zip(seqs, query_lens, strict=True):
        if wants_prompt_logprobs(seq):
            rows.extend(range(offset, offset + query_len - 1))
        offset += query_len
    return rows


def score_prompt_rows(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor | None,
    num_top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The logits of `hidden`'s rows in pieces; with `targets` (the lead rank), each row's
    log-probability of its target and its `num_top` best. Without (the other tensor-parallel
    ranks), only the logits, whose computation is collective."""
    pieces = []
    for start in range(0, hidden.shape[0], PROMPT_LOGITS_CHUNK):
        logits = compute_logits(hidden[start : start + PROMPT_LOGITS_CHUNK]).float()
        if targets is not None:
            pieces.append(
                token_logprobs(logits, targets[start : start + PROMPT_LOGITS_CHUNK], num_top)
            )
    if targets is None:
        return None
    chosen, top_ids, top_values = zip(*pieces, strict=True)
    return torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values)


def prompt_logprobs(
    seqs: list[Sequence],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
) -> list[list[TokenLogprobs] | None]:
    """Per sequence that wants it, one entry per prompt token after the first (`hidden` holds
    the rows that prompt_rows named, in order)."""
    scored_seqs = [seq for seq in seqs if wants_prompt_logprobs(seq)]
    num_top = max(seq.params.prompt_logprobs for seq in scored_seqs)
    targets = torch.tensor(
        [token for seq in scored_seqs for token in seq.token_ids[1 : len(seq)]],
        device=hidden.device,
    )
    scored = iter(
        _unpack(score_prompt_rows(compute_logits, hidden, targets, num_top), num_top)
        if len(targets)
        else ()  # one-token prompts: nothing to score
    )
    result: list[list[TokenLogprobs] | None] = []
    for seq in seqs:
        if not wants_prompt_logprobs(seq):
            result.append(None)
            continue
        wanted = seq.params.prompt_logprobs
        result.append(
            [
                TokenLogprobs(logprob, top_ids[:wanted], top_values[:wanted])
                for logprob, top_ids, top_values in (next(scored) for _ in range(len(seq) - 1))
            ]
        )
    return result


def _unpack(
    scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_top: int
) -> list[tuple[float, list[int], list[float]]]:
    """(logprob, top ids, top logprobs) per row, from one transfer to the host."""
    chosen, top_ids, top_values = scores
    # Token ids are exact in float32 (every vocabulary is below 2**24).
    packed = torch.cat([chosen.unsqueeze(1), top_values, top_ids.float()], dim=1).tolist()
    return [
        (row[0], [int(token) for token in row[1 + num_top :]], row[1 : 1 + num_top])
        for row in packed
    ]

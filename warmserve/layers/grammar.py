"""Constrained decoding's token masks, applied to a step's logits.

A mask is xgrammar's packed bitmask: one int32 word per 32 tokens, a 0 bit for a token the
request's grammar forbids next. The bitmask is filled on the host (see
engine/structured_output.py) and applied here to the rows of the constrained requests only.

On the CPU the mask goes through xgrammar's C++ kernel. On a GPU it goes through plain torch
ops (unpack the bits, masked_fill): a handful of elementwise kernels over [rows, vocab], tens of
microseconds next to a decode step of milliseconds, and nothing is compiled while serving
(xgrammar's Triton kernel would be JIT-compiled by the first structured request of a process).
"""

from __future__ import annotations

import torch
import xgrammar

from warmserve.layers.host_to_device import to_device

BITS_PER_WORD = 32


def allocate_bitmask(rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """A host bitmask for `rows` requests; pinned when the logits live on a GPU, so that its
    copy there does not hold the host."""
    bitmask = xgrammar.allocate_token_bitmask(rows, vocab_size)
    return bitmask.pin_memory() if device.type == "cuda" else bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Sets, in place, the logits of the tokens that `bitmask` forbids to -inf, in `rows` only.
    Row i of the bitmask is row i of the logits; the bitmask stays on the host."""
    vocab_size = logits.shape[-1]
    if logits.device.type == "cpu":
        xgrammar.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=vocab_size, indices=rows, backend="cpu"
        )
        return
    on_device = bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
    apply_token_bitmask_with_torch(logits, on_device, rows)


@torch.inference_mode()  # the logits come from the model's forward: inference tensors
def apply_token_bitmask_with_torch(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]
) -> None:
    """The GPU path, in device-agnostic torch ops; `bitmask` is on the logits' device."""
    index = to_device(rows, logits.device)
    allowed = unpack_bitmask(bitmask.index_select(0, index), logits.shape[-1])
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, masked)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., words] packed bits -> [..., vocab_size] booleans, True where a token is allowed."""
    shifts = torch.arange(BITS_PER_WORD, device=bitmask.device, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :vocab_size].bool()

"""Batch-invariant mode (EngineConfig.batch_invariant): a request's greedy tokens do not depend on
what else its model's steps run.

In the default mode a token's projections and attention are computed by kernels chosen from the
step's shape (cuBLAS's tiling, the decode kernel's context splits, flash attention for a whole
prompt), so in bf16 the same request rounds differently alone and beside 63 others, and greedy
decoding may take another token. In this mode every linear layer runs the fixed-tile matmul of
triton_matmul.py and every attention the paged kernel of triton_prefill.py with one tile shape;
the other operations (RMSNorm, rotary, activations) already work one row at a time. GPU only.
"""

from __future__ import annotations

from torch import nn


def set_batch_invariant(model: nn.Module, enabled: bool) -> None:
    """Points every layer that has a batch-invariant path at it (or back)."""
    for module in model.modules():
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = enabled

"""Steps that carry prompt tokens (a prompt chunk beside decodes, or prompts alone) replayed from
CUDA graphs, one per token-count bucket, captured in the worker's idle gaps after the decode
graphs (engine/graph_buckets.py schedules both).

Eagerly such a step costs the host one launch per kernel per layer: some 12 ms for a 28-layer
model, several times the GPU's work for a 512-token chunk beside 64 decodes, and every stream's
inter-token gap waits for it. In a graph the step is one launch.

A step is padded up to its bucket's token count and to `max_seqs` sequences. The attention kernel
(layers/triton_prefill.py) finds each query tile's sequence on the device from the query start
offsets, so one captured grid serves any mix: padding sequences have no queries (their tiles
return at once), padding tokens belong to no sequence and write their keys and values into the
scratch block. Rows are independent everywhere else (projections, norms, MLP), so padding never
reaches a real row. The logits of every bucket land in one shared buffer.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from warmserve.engine.cuda_graphs import StagedInputs, capture_graph
from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.launched_step import fill_placeholders
from warmserve.layers.attention import AttentionMetadata
from warmserve.protocol import StepInputs

# Token counts of the captured steps. A step that decodes carries at most the prompt budget
# (engine/prompt_budget.py, capped so that it fits the largest bucket with a token per decode);
# longer prefill-only steps run eagerly, GPU-bound enough that a launch per kernel costs little,
# and a larger bucket would keep more activation memory in the graphs' pool.
TOKEN_BUCKETS = (32, 64, 128, 256, 384, 512, 640, 768, 1024)


class MixedGraphs:
    def __init__(
        self,
        model,
        device: torch.device,
        max_seqs: int,
        max_tokens: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        pool_owner,
    ):
        """`pool_owner`: the decode graphs, whose memory pool these graphs share (no two replay
        at once)."""
        self.model = model
        self.device = device
        self.buckets = GraphBuckets(
            min(max_tokens, TOKEN_BUCKETS[-1]), self._capture, TOKEN_BUCKETS
        )
        self.max_seqs = max_seqs
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.pool_owner = pool_owner
        tokens = self.tokens = self.buckets.sizes[-1]
        # One buffer, so a step's metadata crosses in one copy: input ids, positions and cache
        # slots ([3, tokens]); context lengths, each sequence's last row and query starts
        # ([3 * max_seqs + 1]); then the block tables ([max_seqs, max_blocks]).
        self.vectors = 3 * tokens + 3 * max_seqs + 1
        self.static = torch.zeros(
            self.vectors + max_seqs * max_blocks, dtype=torch.long, device=device
        )
        self.input_ids, self.positions, self.slot_mapping = self.static[: 3 * tokens].view(3, -1)
        self.context_lens, self.last_rows, self.query_start = self.static[
            3 * tokens : self.vectors
        ].split([max_seqs, max_seqs, max_seqs + 1])
        self.block_tables = self.static[self.vectors :].view(max_seqs, max_blocks)
        self.inputs = StagedInputs(self.static, max_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # [max_seqs, vocab], written by every graph

    def fits(self, inputs: StepInputs) -> int | None:
        """The captured bucket that can run this step, if any (a step that scores prompt rows
        needs their hidden states, which a graph does not keep)."""
        if inputs.prompt_rows or len(inputs.query_lens) > self.max_seqs:
            return None
        return self.buckets.replayable(len(inputs.input_ids))

    def stage(self, inputs: StepInputs, bucket: int) -> int:
        """Writes the step, padded to `bucket`, into the inputs' host twin; returns the number
        of its leading elements to copy."""
        tokens, seqs = len(inputs.input_ids), len(inputs.query_lens)
        host = self.inputs.host_buffer()
        rows = host[: 3 * self.tokens].reshape(3, self.tokens)
        rows[0, :tokens] = inputs.input_ids
        rows[1, :tokens] = inputs.positions
        rows[2, :tokens] = inputs.slot_mapping
        rows[:, tokens:bucket] = [[0], [0], [self.scratch_slot]]
        per_seq = host[3 * self.tokens : self.vectors]
        context, last, starts = np.split(per_seq, [self.max_seqs, 2 * self.max_seqs])
        ends = list(itertools.accumulate(inputs.query_lens))
        context[:seqs] = inputs.context_lens
        context[seqs:] = 1
        last[:seqs] = [end - 1 for end in ends]
        last[seqs:] = 0
        starts[0] = 0
        starts[1 : seqs + 1] = ends
        starts[seqs + 1 :] = tokens  # padding sequences: no queries
        tables = host[self.vectors :].reshape(self.max_seqs, self.max_blocks)
        self.inputs.write_tables(tables, inputs.block_tables)
        return self.vectors + seqs * self.max_blocks

    def run(self, inputs: StepInputs, bucket: int, fill=None, previous=None) -> torch.Tensor:
        """Logits [seqs, vocab] of each sequence's last row; `fill` and `previous` as for a
        decode graph (launched_step.fill_placeholders)."""
        self.inputs.send(self.stage(inputs, bucket))
        fill_placeholders(self.input_ids, fill, previous)
        self.graphs[bucket].replay()
        return self.logits[: len(inputs.query_lens)]

    def _forward(self, bucket: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_lens=[bucket],  # the kernel's tile shape: that of the longest query run
            context_lens=self.context_lens,
            context_lens_host=[],
            block_tables=self.block_tables,
            max_context_len=self.max_blocks * self.block_size,
            decode_only=False,
            query_start=self.query_start,
            padded=True,
        )
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], meta)
        logits = self.model.compute_logits(hidden.index_select(0, self.last_rows))
        if self.logits is None:
            self.logits = torch.empty(logits.shape, dtype=torch.float32, device=self.device)
        self.logits.copy_(logits)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        self.inputs.pin()

        def point_at_scratch() -> None:  # no sequence; every token into the scratch block
            self.input_ids.zero_()
            self.positions.zero_()
            self.slot_mapping.fill_(self.scratch_slot)
            self.context_lens.fill_(1)
            self.last_rows.zero_()
            self.query_start.zero_()

        graph, _ = capture_graph(
            self.device, self.pool_owner.pool, point_at_scratch, lambda: self._forward(bucket)
        )
        self.pool_owner.pool = graph.pool()
        self.graphs[bucket] = graph

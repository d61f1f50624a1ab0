"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket, captured the first
time a bucket is needed (never between a load and its first token, which is a prefill).

A graph reads its inputs from static device buffers; a step copies its metadata into them in one
host-to-device copy per buffer. Rows beyond the real batch point at a scratch block of the KV
cache, so padding never touches a sequence's cache.
"""

from __future__ import annotations

import torch

from warmserve.layers.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(
        self,
        model,
        device: torch.device,
        max_seqs: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
    ):
        self.model = model
        self.device = device
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks = max_blocks
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.long, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (size, max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        # Host staging for one step's metadata. Not pinned: pinning costs milliseconds at load
        # time, and these copies are a few kilobytes.
        self.host_vectors = torch.zeros(4, size, dtype=torch.long)
        self.host_tables = torch.zeros(size, max_blocks, dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(self, inputs) -> torch.Tensor:
        """Logits [batch, vocab] for a decode step (one new token per sequence)."""
        batch = len(inputs.input_ids)
        bucket = self.bucket(batch)
        vectors, tables = self.host_vectors[:, :bucket], self.host_tables[:bucket]
        scratch_slot = self.scratch_block * self.block_size
        vectors[0, :batch] = torch.tensor(inputs.input_ids)
        vectors[1, :batch] = torch.tensor(inputs.positions)
        vectors[2, :batch] = torch.tensor(inputs.slot_mapping)
        vectors[3, :batch] = torch.tensor(inputs.context_lens)
        vectors[:, batch:] = torch.tensor([[0], [0], [scratch_slot], [1]])
        tables.fill_(self.scratch_block)
        for row, table in enumerate(inputs.block_tables):
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        self.input_ids[:bucket].copy_(vectors[0])
        self.positions[:bucket].copy_(vectors[1])
        self.slot_mapping[:bucket].copy_(vectors[2])
        self.context_lens[:bucket].copy_(vectors[3])
        self.block_tables[:bucket].copy_(tables)
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_lens=[1] * bucket,
            context_lens=self.context_lens[:bucket],
            context_lens_host=[],  # decode never reads it
            block_tables=self.block_tables[:bucket],
            max_context_len=self.max_blocks * self.block_size,
            decode_only=True,
        )
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], meta)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)  # warm-up outside the graph, as capture requires
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[bucket] = self._forward(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = graph

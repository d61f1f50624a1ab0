"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket, each captured when the
worker has nothing else to do (the schedule is engine/graph_buckets.py's).

A graph reads its inputs from one static device buffer; a step fills a pinned twin of it on the
host and copies it over in one asynchronous copy. Rows beyond the real batch point at a scratch
block of the KV cache, so padding never touches a sequence's cache.
"""

from __future__ import annotations

import torch

from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.launched_step import fill_placeholders
from warmserve.layers.attention import AttentionMetadata


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
        self.buckets = GraphBuckets(max_seqs, self._capture)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks = max_blocks
        size = self.size = self.buckets.sizes[-1]
        # A step's metadata in one buffer, so that it crosses to the device in one copy: input
        # ids, positions, cache slots and context lengths ([4, size]), then the block tables
        # ([size, max_blocks]). The graphs read the device buffer's views.
        self.static = torch.zeros(4 * size + size * max_blocks, dtype=torch.long, device=device)
        vectors = self.static[: 4 * size].view(4, size)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = vectors
        self.block_tables = self.static[4 * size :].view(size, max_blocks)
        self.block_tables.fill_(scratch_block)
        self.context_lens.fill_(1)
        self.inputs = StagedInputs(self.static, size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def run(self, inputs, bucket: int, fill=None, previous=None) -> torch.Tensor:
        """Logits [batch, vocab] for a decode step (one new token per sequence) from the
        captured graph of `bucket`; `fill` and `previous`: the input ids that the step before
        samples on the device (see launched_step.fill_placeholders)."""
        batch = len(inputs.input_ids)
        host = self.inputs.host_buffer()
        vectors = host[: 4 * self.size].reshape(4, self.size)
        vectors[0, :batch] = inputs.input_ids
        vectors[1, :batch] = inputs.positions
        vectors[2, :batch] = inputs.slot_mapping
        vectors[3, :batch] = inputs.context_lens
        # Padding rows: one token of context in the scratch block, so they never touch a
        # sequence's cache. Columns past a row's table are never read (its context ends there).
        vectors[:, batch:bucket] = [[0], [0], [self.scratch_block * self.block_size], [1]]
        tables = host[4 * self.size :].reshape(self.size, self.max_blocks)
        self.inputs.write_tables(tables, inputs.block_tables)
        tables[batch:bucket, 0] = self.scratch_block
        self.inputs.forget_rows(range(batch, bucket))
        self.inputs.send(4 * self.size + bucket * self.max_blocks)
        fill_placeholders(self.input_ids, fill, previous)
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
        if self.inputs.pin():
            self.inputs.host[4 * self.size :] = self.scratch_block

        def point_at_scratch() -> None:
            # With the last replay's rows still in the buffer, the warm-up would write keys and
            # values into slots that other sequences may hold by now (a block freed and handed
            # out again, or cached as a prefix). The next step copies its rows in whole from
            # the host twin.
            self.input_ids.zero_()
            self.positions.zero_()
            self.slot_mapping.fill_(self.scratch_block * self.block_size)
            self.context_lens.fill_(1)
            self.block_tables.fill_(self.scratch_block)

        graph, self.logits[bucket] = capture_graph(
            self.device, self.pool, point_at_scratch, lambda: self._forward(bucket)
        )
        self.pool = graph.pool()
        self.graphs[bucket] = graph


class StagedInputs:
    """A graph's inputs: one static device buffer that its graphs read, and a pinned twin on the
    host that each step fills and copies over in one asynchronous copy. A sequence's block
    table only grows while it runs, so a step writes only the blocks added to each row's table
    since the last step (the table each row holds, and how much of it is written)."""

    def __init__(self, static: torch.Tensor, rows: int):
        self.static = static
        self.host: torch.Tensor | None = None  # made at the first capture (see pin)
        self.row_tables: list[list[int] | None] = [None] * rows
        self.row_lengths = [0] * rows
        self.copied: torch.cuda.Event | None = None  # after the last copy out of `host`

    def pin(self) -> bool:
        """Makes the pinned twin (zeros), at the first capture rather than at load: pinning
        costs time. True when it made it."""
        if self.host is not None:
            return False
        self.host = torch.zeros_like(self.static, device="cpu").pin_memory()
        return True

    def host_buffer(self):
        """The twin as a numpy array, once the last step's copy has read it."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.numpy()

    def write_tables(self, tables, block_tables: list[list[int]]) -> None:
        """Writes each row's table into `tables` (a view of the twin), new blocks only."""
        for row, table in enumerate(block_tables):
            written = self.row_lengths[row] if self.row_tables[row] is table else 0
            if len(table) > written:
                tables[row, written : len(table)] = table[written:]
                self.row_tables[row], self.row_lengths[row] = table, len(table)

    def forget_rows(self, rows: range) -> None:
        """These rows' tables were overwritten: the next step writes them whole."""
        for row in rows:
            self.row_tables[row] = None

    def send(self, used: int) -> None:
        """Copies the twin's first `used` elements to the device buffer."""
        self.static[:used].copy_(self.host[:used], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()


def capture_graph(device: torch.device, pool, point_at_scratch, forward):
    """Captures `forward` into a CUDA graph that allocates from `pool`; returns the graph and
    what `forward` returned while captured. Captured by hand rather than with torch.cuda.graph,
    which synchronizes the device and empties the allocator's cache first: that would stall
    every other model this worker is serving. Thread-local capture leaves the worker's
    DMA-registration thread free. The warm-up that capture requires runs for real, after
    `point_at_scratch` has pointed every row of the inputs at the KV cache's scratch block."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        point_at_scratch()
        forward()
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            captured = forward()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, captured

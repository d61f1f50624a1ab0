"""Runs the model for one scheduled batch: builds the batch metadata, owns the KV cache, samples.

With tensor parallelism the lead rank builds the step and broadcasts it; every rank runs the same
forward on its shard; only the lead samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from warmserve.config import SamplingParams
from warmserve.engine import logprobs
from warmserve.engine.cuda_graphs import DecodeGraphs
from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.sequence import Sequence
from warmserve.layers.attention import AttentionMetadata
from warmserve.layers.logits_processors import process_logits
from warmserve.layers.parallel import tp_rank, tp_world_size
from warmserve.layers.sampling import sample
from warmserve.protocol import TokenLogprobs

if TYPE_CHECKING:
    from warmserve.engine.structured_output import StructuredOutputs


@dataclass
class StepInputs:
    """What every rank needs to run one forward: plain lists, cheap to broadcast."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    # Rows of input_ids whose logits score a prompt (see engine/logprobs.py); usually none.
    prompt_rows: list[int] = field(default_factory=list)


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per sequence, when it asks
    prompt_logprobs: list[list[TokenLogprobs] | None]  # per sequence, in its first prefill


RELEASE = "release"  # broadcast by the lead when the model is unloaded


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_model_len: int,
    ):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        layers = model.attention_layers()
        # One allocation for the whole cache: [layers, k/v, blocks, block_size, kv heads, head dim],
        # plus one scratch block that padded rows of a CUDA-graph batch write into.
        self.kv_cache = torch.empty(
            len(layers),
            2,
            num_blocks + 1,
            block_size,
            num_kv_heads,
            head_dim,
            dtype=dtype,
            device=device,
        )
        for index, attention in enumerate(layers):
            attention.k_cache = self.kv_cache[index, 0]
            attention.v_cache = self.kv_cache[index, 1]
        self.tp_size = tp_world_size()
        self.is_lead = tp_rank() == 0
        self.decode_graphs = None
        # Which decode batch sizes have a graph; the worker captures them in its idle gaps.
        self.graph_buckets: GraphBuckets | None = None
        if device.type == "cuda" and self.tp_size == 1:
            self.decode_graphs = DecodeGraphs(
                model, device, max_num_seqs, -(-max_model_len // block_size), block_size, num_blocks
            )
            self.graph_buckets = self.decode_graphs.buckets

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def close(self) -> None:
        self.decode_graphs = None
        self.graph_buckets = None
        self.model = None
        self.kv_cache = None

    def build_inputs(self, seqs: list[Sequence]) -> StepInputs:
        inputs = StepInputs([], [], [], [], [], [])
        for seq in seqs:
            start = seq.num_computed_tokens
            end = start + seq.num_scheduled_tokens
            inputs.input_ids.extend(seq.token_ids[start:end])
            inputs.positions.extend(range(start, end))
            table = seq.block_table
            inputs.slot_mapping.extend(
                table[pos // self.block_size] * self.block_size + pos % self.block_size
                for pos in range(start, end)
            )
            inputs.query_lens.append(end - start)
            inputs.context_lens.append(end)
            inputs.block_tables.append(table)
        inputs.prompt_rows = logprobs.prompt_rows(seqs, inputs.query_lens)
        return inputs

    def execute(
        self,
        seqs: list[Sequence],
        generators: list[torch.Generator | None],
        eos_token_ids: frozenset[int] = frozenset(),
        structured_outputs: StructuredOutputs | None = None,
    ) -> SampledTokens:
        """Lead rank: runs one step for `seqs`; returns a sampled token for each sequence whose
        step reaches its last token (not for a prompt chunk that only fills the cache), in
        `seqs`' order, and the log-probabilities those sequences ask for. The constrained
        sequences' token masks are filled while the forward runs."""
        sampling = [index for index, seq in enumerate(seqs) if seq.samples_this_step]
        sampled_seqs = [seqs[index] for index in sampling]
        masks = None
        if structured_outputs is not None:
            masks = structured_outputs.start_masks(sampled_seqs)
        inputs = self.build_inputs(seqs)
        if self.tp_size > 1:
            dist.broadcast_object_list([inputs], src=0)
        decode = all(n == 1 for n in inputs.query_lens)
        prompt_hidden = None
        bucket = None
        if decode and self.decode_graphs is not None:
            bucket = self.decode_graphs.buckets.replayable(len(seqs))
        if bucket is not None:
            logits = self.decode_graphs.run(inputs, bucket)
        else:  # a prefill or mixed step, or a decode batch whose graph is not captured yet
            logits, prompt_hidden = self._forward(inputs)
        if not sampling:  # every sequence ran a prompt chunk
            return SampledTokens([], [], [])
        if len(sampling) < len(seqs):
            rows = torch.tensor(sampling, dtype=torch.long, device=logits.device)
            logits = logits.index_select(0, rows)
        if masks is not None:
            masks.apply(logits)
        params: list[SamplingParams] = [seq.params for seq in sampled_seqs]
        processed = process_logits(
            logits,
            params,
            [seq.token_ids for seq in sampled_seqs],
            [seq.num_prompt_tokens for seq in sampled_seqs],
            eos_token_ids,
        )
        tokens = sample(processed, params, [generators[index] for index in sampling])
        prompt_logprobs: list[list[TokenLogprobs] | None] = [None] * len(seqs)
        if prompt_hidden is not None:
            with torch.inference_mode():
                prompt_logprobs = logprobs.prompt_logprobs(
                    seqs, self.model.compute_logits, prompt_hidden
                )
        return SampledTokens(
            tokens.tolist(),
            logprobs.sampled_logprobs(logits, tokens, params),
            [prompt_logprobs[index] for index in sampling],
        )

    def follow(self) -> None:
        """Other ranks: runs the lead's steps until the lead releases the model."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == RELEASE:
                dist.barrier()  # the lead leaves the group only after every rank heard it
                return
            _, prompt_hidden = self._forward(box[0])
            if prompt_hidden is not None:  # its logits are gathered across the ranks
                with torch.inference_mode():
                    logprobs.score_prompt_rows(self.model.compute_logits, prompt_hidden, None, 0)

    def release_followers(self) -> None:
        if self.tp_size > 1 and self.is_lead:
            dist.broadcast_object_list([RELEASE], src=0)
            dist.barrier()

    @torch.inference_mode()
    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of each sequence's last token, and the hidden states of the prompt rows
        (None when there are none)."""
        seqs, tokens = len(inputs.query_lens), len(inputs.input_ids)
        max_blocks = max(len(table) for table in inputs.block_tables)
        query_ends = list(itertools.accumulate(inputs.query_lens))
        flat = [
            *inputs.input_ids,
            *inputs.positions,
            *inputs.slot_mapping,
            *inputs.context_lens,
            *(end - 1 for end in query_ends),  # each sequence's last row
            0,
            *query_ends,  # with the 0 before them: where each sequence's queries start
        ]
        for table in inputs.block_tables:
            flat += table
            flat += [0] * (max_blocks - len(table))
        staged = torch.tensor(flat, dtype=torch.long)
        if self.device.type == "cuda":
            # Pinned, so the copy is asynchronous: a pageable copy would hold the host until the
            # stream reaches it, and after a load that is behind the whole weight copy.
            staged = staged.pin_memory()
        on_device = staged.to(self.device, non_blocking=True)
        vectors = 3 * tokens + 3 * seqs + 1
        input_ids, positions, slots, context_lens, last, query_start = on_device[:vectors].split(
            [tokens, tokens, tokens, seqs, seqs, seqs + 1]
        )
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_lens=inputs.query_lens,
            context_lens=context_lens,
            context_lens_host=inputs.context_lens,
            block_tables=on_device[vectors:].view(seqs, max_blocks),
            max_context_len=max(inputs.context_lens),
            decode_only=all(n == 1 for n in inputs.query_lens),
            query_start=query_start,
        )
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden.index_select(0, last)).float()
        if not inputs.prompt_rows:
            return logits, None
        rows = torch.tensor(inputs.prompt_rows, device=self.device)
        return logits, hidden.index_select(0, rows)

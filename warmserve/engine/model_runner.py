"""Runs the model for one scheduled batch: builds the batch metadata, owns the KV cache, samples.

With tensor parallelism the lead rank builds the step and sends it to the other ranks (through
`send_step`, the worker's socket to each); every rank runs the same forward on its shard, decode
steps from CUDA graphs that hold the group's collectives; only the lead samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from warmserve.config import SamplingParams
from warmserve.engine import logprobs
from warmserve.engine.block_manager import SCRATCH_BLOCK
from warmserve.engine.cuda_graphs import DecodeGraphs
from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.kv_pool import InsufficientMemory
from warmserve.engine.launched_step import LaunchedStep, fill_placeholders
from warmserve.engine.mixed_graphs import MixedGraphs
from warmserve.engine.sequence import PLACEHOLDER, Sequence
from warmserve.layers.attention import AttentionMetadata
from warmserve.layers.host_to_device import to_device
from warmserve.layers.logits_processors import process_logits
from warmserve.layers.parallel import tp_rank, tp_world_size
from warmserve.layers.sampling import sample
from warmserve.protocol import StepInputs, TokenLogprobs

# Steps that take every launch variant of an eager step's kernels (sequences' query lengths): one
# whole prompt (the dense path); a mixed batch whose sequences bring a few queries each; one with
# a prompt chunk (the prefill kernel's larger query tiles).
WARM_STEPS = ((8,), (1, 2), (1, 64))

# What a step ran: a decode batch from its captured graph or eagerly, decodes beside prompt
# tokens, or prompt tokens alone (each from a graph or eagerly).
STEP_KINDS = (
    "decode-graph",
    "decode-eager",
    "mixed-graph",
    "mixed",
    "prefill-graph",
    "prefill",
)

if TYPE_CHECKING:
    from warmserve.engine.kv_region import KVRegion
    from warmserve.engine.structured_output import StructuredOutputs


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        block_size: int,
        kv_region: KVRegion,
        max_num_seqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        send_step: Callable[[StepInputs], None] | None = None,
    ):
        """`send_step`: the lead rank of a tensor-parallel model hands each step's inputs to
        the other ranks with it. `max_num_batched_tokens`: the most tokens a step carries, which
        bounds the prompt-step graphs."""
        self.model = model
        self.device = device
        self.block_size = block_size
        # The cache is a range of the worker's KV pool: a fixed address for the model's whole
        # residency, with pages mapped as the block manager needs more blocks.
        self.kv_region = kv_region
        for attention, (k_cache, v_cache) in zip(
            model.attention_layers(), kv_region.layer_caches, strict=True
        ):
            attention.k_cache, attention.v_cache = k_cache, v_cache
        self.send_step = send_step
        self.is_lead = tp_rank() == 0
        self.decode_graphs = None
        self.in_group = tp_world_size() > 1
        # Which decode batch sizes have a graph. The worker captures a lone model's graphs in its
        # idle gaps; the ranks of a group capture a bucket together, in the step that first
        # needs it (their graphs hold the group's collectives, so no rank may capture alone).
        self.graph_buckets: GraphBuckets | None = None
        # Steps with prompt tokens from graphs too: a lone model's only, captured after its
        # decode graphs (a group's ranks would have to capture each bucket together).
        self.mixed_graphs: MixedGraphs | None = None
        if device.type == "cuda":
            self.decode_graphs = DecodeGraphs(
                model,
                device,
                max_num_seqs,
                -(-max_model_len // block_size),
                block_size,
                SCRATCH_BLOCK,
            )
            if not self.in_group:
                self.graph_buckets = self.decode_graphs.buckets
                self.mixed_graphs = MixedGraphs(
                    model,
                    device,
                    max_num_seqs,
                    max_num_batched_tokens,
                    -(-max_model_len // block_size),
                    block_size,
                    SCRATCH_BLOCK,
                    self.decode_graphs,
                )
        # Not a rank of a tensor-parallel group: the host may launch a step before it has read
        # the tokens of the one before (the other ranks would need them on their host).
        self.is_alone = send_step is None and not self.in_group
        self.last_step_kind: str | None = None  # of STEP_KINDS: the last step _run ran
        # Whether the eager step's kernels have run once (see warm_step_kernels).
        self.step_kernels_warm = self.graph_buckets is None

    def close(self) -> None:
        """Drops the graphs and the model (which point into the cache), then hands the cache's
        pages back to the pool."""
        self.decode_graphs = None
        self.graph_buckets = None
        self.mixed_graphs = None
        for attention in self.model.attention_layers():
            attention.k_cache = attention.v_cache = None
        self.model = None
        self.kv_region.release()

    def warm_step_kernels(self) -> None:
        """Runs an eager step of each of WARM_STEPS once, every token in the scratch block: the
        first run of a kernel variant compiles it (most of a second at an 8B shape), which
        belongs in an idle gap, not in a step with streams waiting on it."""
        for query_lens in WARM_STEPS:
            inputs = StepInputs([], [], [], [], [], [])
            for query_len in query_lens:
                context_len = max(query_len, 2)  # a decode row has a token before its own
                blocks = -(-context_len // self.block_size)
                inputs.input_ids.extend([0] * query_len)
                inputs.positions.extend(range(context_len - query_len, context_len))
                inputs.slot_mapping.extend(
                    SCRATCH_BLOCK * self.block_size + position % self.block_size
                    for position in range(context_len - query_len, context_len)
                )
                inputs.query_lens.append(query_len)
                inputs.context_lens.append(context_len)
                inputs.block_tables.append([SCRATCH_BLOCK] * blocks)
            self._forward(inputs)
        self.step_kernels_warm = True

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

    def launch(
        self,
        seqs: list[Sequence],
        generators: list[torch.Generator | None],
        eos_token_ids: frozenset[int] = frozenset(),
        structured_outputs: StructuredOutputs | None = None,
        previous: LaunchedStep | None = None,
    ) -> LaunchedStep:
        """Lead rank: launches one step for `seqs` and samples a token for each sequence whose
        step reaches its last token (not for a prompt chunk that only fills the cache), in
        `seqs`' order, with the log-probabilities those sequences ask for. A sequence whose last
        token is still a placeholder of `previous` (launched, not resolved) takes it on the
        device. The constrained sequences' token masks are filled while the forward runs."""
        sampling = [index for index, seq in enumerate(seqs) if seq.samples_this_step]
        sampled_seqs = [seqs[index] for index in sampling]
        masks = None
        if structured_outputs is not None:
            masks = structured_outputs.start_masks(sampled_seqs)
        inputs = self.build_inputs(seqs)
        if self.send_step is not None:
            inputs.kv_blocks = self.kv_region.num_blocks
            self.send_step(inputs)
        fill = self._placeholder_fill(seqs, inputs, previous)
        logits, prompt_hidden = self._run(inputs, fill, previous)
        if not sampling:  # every sequence ran a prompt chunk
            return LaunchedStep(seqs, None)
        if len(sampling) < len(seqs):
            rows = to_device(sampling, logits.device, torch.long)
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
        return LaunchedStep(
            seqs,
            tokens,
            rows={seq.request_id: row for row, seq in enumerate(sampled_seqs)},
            logprobs=logprobs.sampled_logprobs(logits, tokens, params),
            prompt_logprobs=[prompt_logprobs[index] for index in sampling],
        )

    def _placeholder_fill(
        self, seqs: list[Sequence], inputs: StepInputs, previous: LaunchedStep | None
    ) -> torch.Tensor | None:
        """[2, n] on the device: the rows of the step's input ids that are placeholders of
        `previous`, and the rows of its sampled tokens that hold them (None: there are none)."""
        targets, sources = [], []
        end = 0
        for seq, query_len in zip(seqs, inputs.query_lens, strict=True):
            end += query_len
            # A placeholder is a sequence's last token, and its step's input ends there.
            if seq.token_ids[-1] == PLACEHOLDER and seq.samples_this_step:
                targets.append(end - 1)
                sources.append(previous.rows[seq.request_id])
        if not targets:
            return None
        return to_device([targets, sources], self.device, torch.long)

    def run_followed(self, inputs: StepInputs) -> None:
        """Other ranks: one step of the lead's, the same collectives in the same order, after
        mapping as many cache blocks as the lead has."""
        if self.kv_region.grow_to(inputs.kv_blocks) < inputs.kv_blocks:
            raise InsufficientMemory("this rank's KV pool cannot match the lead's cache")
        _, prompt_hidden = self._run(inputs, None, None)
        if prompt_hidden is not None:  # its logits are gathered across the ranks
            with torch.inference_mode():
                logprobs.score_prompt_rows(self.model.compute_logits, prompt_hidden, None, 0)

    def _run(
        self, inputs: StepInputs, fill: torch.Tensor | None, previous: LaunchedStep | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every rank takes the same path for the same inputs (graphs or eager), so their
        collectives pair up. `fill`: see _placeholder_fill."""
        bucket, batch = None, len(inputs.query_lens)
        decode = all(n == 1 for n in inputs.query_lens)
        if decode and self.in_group and self.decode_graphs is not None:
            buckets = self.decode_graphs.buckets
            while buckets.pending and buckets.replayable(batch) is None:
                buckets.capture_next()
            bucket = buckets.replayable(batch)
        elif decode and self.graph_buckets is not None:
            bucket = self.graph_buckets.replayable(batch)
            if bucket is None:
                self.graph_buckets.note_eager(batch)
        if bucket is not None and self.decode_graphs is not None:
            self.last_step_kind = "decode-graph"
            return self.decode_graphs.run(inputs, bucket, fill, previous), None
        if decode:  # its graph is not captured yet
            self.last_step_kind = "decode-eager"
            return self._forward(inputs, fill, previous)
        kind = "mixed" if 1 in inputs.query_lens else "prefill"
        if self.mixed_graphs is not None:
            bucket = self.mixed_graphs.fits(inputs)
            if bucket is not None:
                self.last_step_kind = f"{kind}-graph"
                return self.mixed_graphs.run(inputs, bucket, fill, previous), None
            if not inputs.prompt_rows:
                self.mixed_graphs.buckets.note_eager(len(inputs.input_ids))
        self.last_step_kind = kind
        return self._forward(inputs, fill, previous)

    @torch.inference_mode()
    def _forward(
        self,
        inputs: StepInputs,
        fill: torch.Tensor | None = None,
        previous: LaunchedStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        # Queued, not waited for: after a load the stream is behind the whole weight copy.
        on_device = to_device(flat, self.device, torch.long)
        vectors = 3 * tokens + 3 * seqs + 1
        input_ids, positions, slots, context_lens, last, query_start = on_device[:vectors].split(
            [tokens, tokens, tokens, seqs, seqs, seqs + 1]
        )
        fill_placeholders(input_ids, fill, previous)
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
        rows = to_device(inputs.prompt_rows, self.device)
        return logits, hidden.index_select(0, rows)

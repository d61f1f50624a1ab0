"""One deployment's inference engine: scheduler + block manager + model runner, stepped by the
worker that holds the model (the lead rank with tensor parallelism). engine_build makes one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from warmserve.config import SamplingParams
from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.kv_pool import KVPool
from warmserve.engine.kv_region import KVRegion
from warmserve.engine.launched_step import LaunchedStep, StepClock
from warmserve.engine.model_runner import ModelRunner
from warmserve.engine.prompt_budget import PromptBudget
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.sequence import Sequence, SequenceStatus
from warmserve.engine.skeletons import SKELETONS, Skeleton
from warmserve.engine.weight_copy import WeightCopy
from warmserve.loader.gguf_tokenizer import tokenizer_json
from warmserve.models.config import ModelConfig
from warmserve.protocol import StepInputs, TokenOutput

if TYPE_CHECKING:
    from warmserve.engine.structured_output import StructuredOutputs


class RequestRejected(ValueError):
    """A request that this model cannot take (too long, bad token ids, duplicate id)."""


def needs_host_tokens(params: SamplingParams) -> bool:
    """Whether a step of this request needs the tokens of the step before on the host (not
    only on the device): penalties count them, grammars advance on them, and log-probabilities
    are read with them."""
    return (
        params.penalized
        or params.logprobs is not None
        or params.prompt_logprobs is not None
        or params.structured_output is not None
    )


class Engine:
    def __init__(
        self, config: ModelConfig, runner: ModelRunner, scheduler: Scheduler, weights_bytes: int
    ):
        self.config = config
        self.runner = runner
        self.scheduler = scheduler
        self.weights_bytes = weights_bytes
        self.activation_bytes = 0  # kept free for a step's activations (part of the footprint)
        self.kv_pool: KVPool | None = None
        self.kv_owner: object = None  # the pool's claim for the weights and activations
        self.owns_kv_pool = False  # a pool of its own (built alone, not in a worker)
        self.max_model_len = scheduler.limits.max_model_len
        self.generators: dict[str, torch.Generator] = {}
        self.sequences: dict[str, Sequence] = {}
        # Set when the model's module tree is kept for a reload once it is unloaded.
        self.skeleton_key: tuple | None = None
        self.skeleton: Skeleton | None = None
        self.weights_ready: WeightCopy | None = None  # a load's copy, still running
        self.load_phases: dict[str, float] = {}
        # The model's folder or GGUF file (structured output builds its vocabulary from its
        # tokenizer.json, see loader.gguf_tokenizer.tokenizer_json), and the
        # constrained requests' grammars, made on the first such request.
        self.tokenizer_dir: Path | None = None
        self.structured_outputs: StructuredOutputs | None = None
        self.failures: list[tuple[str, str]] = []
        # Asynchronous scheduling (EngineConfig.async_scheduling): the step launched, not yet
        # resolved; and the requests whose steps need their tokens on the host (see _overlaps).
        self.async_scheduling = False
        self.in_flight: LaunchedStep | None = None
        self.host_token_requests: set[str] = set()
        self.last_step_kind: str | None = None  # of model_runner.STEP_KINDS; None: none launched
        # How many prompt tokens a step that decodes may carry (the scheduler's prompt_budget),
        # from the times of the synchronous steps.
        self.prompt_budget = PromptBudget(scheduler.prompt_budget, scheduler.prompt_budget, 0)

    @property
    def kv_region(self) -> KVRegion:
        return self.runner.kv_region

    @property
    def footprint_bytes(self) -> int:
        """What placement counts for the model on its worker: weights, activation headroom and
        the KV cache it always keeps (the rest of its cache is the pool's, elastic)."""
        return self.weights_bytes + self.activation_bytes + self.kv_region.min_bytes

    @property
    def fixed_bytes(self) -> int:
        """The model's memory outside the KV pool."""
        return self.weights_bytes + self.activation_bytes

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if request_id in self.sequences:
            raise RequestRejected(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise RequestRejected("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, and at least one must be left to generate"
            )
        if any(not 0 <= token < self.vocab_size for token in prompt_token_ids):
            raise RequestRejected(f"token ids must lie in [0, {self.vocab_size})")
        if any(token >= self.vocab_size for token, _ in params.logit_bias):
            raise RequestRejected(f"logit_bias: token ids must lie in [0, {self.vocab_size})")
        if max(params.logprobs or 0, params.prompt_logprobs or 0) > self.vocab_size:
            raise RequestRejected(f"logprobs: this model has only {self.vocab_size} tokens")
        budget = self.scheduler.limits.max_num_batched_tokens
        if params.prompt_logprobs is not None and len(prompt_token_ids) > budget:
            # A scored prompt goes through the model in one step, which runs at most this many.
            raise RequestRejected(
                f"echo with logprobs scores prompts of at most {budget} tokens; this one has "
                f"{len(prompt_token_ids)}"
            )
        grammars = self._structured_outputs() if params.structured_output is not None else None
        seq = Sequence(request_id, prompt_token_ids, params)
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(params.seed)
            self.generators[request_id] = generator
        self.sequences[request_id] = seq
        if needs_host_tokens(params):
            self.host_token_requests.add(request_id)
        if grammars is None:
            self.scheduler.add(seq)
        else:  # joins the scheduler once its grammar is compiled
            grammars.add(seq)

    def _structured_outputs(self) -> StructuredOutputs:
        found = tokenizer_json(self.tokenizer_dir) if self.tokenizer_dir else None
        if found is None:
            raise RequestRejected("structured output needs the model's tokenizer.json")
        if self.structured_outputs is None:
            # Imported here: xgrammar takes a second to import, which only the workers that
            # serve structured output pay, once per process.
            from warmserve.engine.structured_output import StructuredOutputs

            self.structured_outputs = StructuredOutputs.of(self, found)
        return self.structured_outputs

    def take_failures(self) -> list[tuple[str, str]]:
        """Requests that failed after they were added (a grammar that did not compile), with
        why; the worker reports them to the server."""
        failures, self.failures = self.failures, []
        return failures

    def _forget(self, request_id: str) -> Sequence | None:
        self.generators.pop(request_id, None)
        self.host_token_requests.discard(request_id)
        if self.structured_outputs is not None:
            self.structured_outputs.remove(request_id)
        return self.sequences.pop(request_id, None)

    def abort_request(self, request_id: str) -> bool:
        if self._forget(request_id) is None:
            return False
        self.scheduler.abort(request_id)  # not there while its grammar compiles
        return True

    def has_unfinished_requests(self) -> bool:
        compiling = self.structured_outputs is not None and self.structured_outputs.compiling
        return self.scheduler.has_unfinished() or bool(compiling) or self.in_flight is not None

    def step(self) -> list[TokenOutput]:
        """Schedules and launches a step; returns the tokens of the step that ended. With
        asynchronous scheduling the step launched now is resolved in the next call, after the
        one after it is launched: the host schedules and prepares a step while the device runs
        the one before. A step whose sequences need their tokens on the host first (penalties,
        log-probabilities, grammars) waits for the step before it to resolve."""
        outputs = [] if self._overlaps() else self.resolve_in_flight()
        if self.structured_outputs is not None:
            for request_id, error in self.structured_outputs.admit_compiled(self.scheduler):
                self._forget(request_id)
                self.failures.append((request_id, error))
        seqs = self.scheduler.schedule()
        launched = self._launch(seqs) if seqs else None
        self.last_step_kind = self.runner.last_step_kind if launched is not None else None
        previous, self.in_flight = self.in_flight, launched
        if previous is not None:
            outputs += self._resolve(previous)
        if not self._overlaps():
            outputs += self.resolve_in_flight()
        return outputs

    def resolve_in_flight(self) -> list[TokenOutput]:
        """The tokens of the step in flight, now: the worker calls it when another model steps
        next, whose step would otherwise hold these tokens back."""
        if self.in_flight is None:
            return []
        outputs = self._resolve(self.in_flight)
        self.in_flight = None
        return outputs

    def _overlaps(self) -> bool:
        """Whether a step may launch before the one before it is resolved."""
        return self.async_scheduling and not self.host_token_requests and self.runner.is_alone

    def _launch(self, seqs: list[Sequence]) -> LaunchedStep:
        device = self.runner.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if self.weights_ready is not None:  # the load's copy runs on the copy stream
            self.weights_ready.order_before(stream)
            self.weights_ready = None
        generators = [self.generators.get(seq.request_id) for seq in seqs]
        clock = StepClock(stream)
        launched = self.runner.launch(
            seqs,
            generators,
            self.scheduler.eos_token_ids,
            self.structured_outputs,
            self.in_flight,
        )
        clock.stop()
        launched.clock = clock
        launched.prompt_tokens = sum(n for seq in seqs if (n := seq.num_scheduled_tokens) > 1)
        launched.decodes = sum(seq.num_scheduled_tokens == 1 for seq in seqs)
        launched.placeholders = self.scheduler.commit(seqs)
        launched.queued(copy_tokens=self._overlaps(), stream=stream)
        return launched

    def _resolve(self, launched: LaunchedStep) -> list[TokenOutput]:
        """Reads a launched step's tokens and hands them to its sequences; returns the outputs
        of those still running when it launched and not ended since (aborted)."""
        token_ids = launched.token_ids()
        sampling = [
            seq
            for seq, index in zip(launched.seqs, launched.placeholders, strict=True)
            if index is not None
        ]
        if self.structured_outputs is not None:
            self.structured_outputs.accept(sampling, token_ids)
        tokens = iter(token_ids)
        per_seq = [next(tokens) if index is not None else None for index in launched.placeholders]
        ended = {seq.request_id for seq in sampling if seq.status is SequenceStatus.FINISHED}
        self.scheduler.resolve(launched.seqs, launched.placeholders, per_seq)
        outputs = []
        for row, (seq, token) in enumerate(zip(sampling, token_ids, strict=True)):
            if seq.request_id in ended:
                continue
            outputs.append(
                TokenOutput(
                    seq.request_id,
                    token,
                    seq.finish_reason,
                    launched.logprobs[row],
                    launched.prompt_logprobs[row],
                )
            )
            if seq.finish_reason is not None:
                self._forget(seq.request_id)
        self._time_prompt_budget(launched)
        return outputs

    def _time_prompt_budget(self, launched: LaunchedStep) -> None:
        if launched.clock is None:
            return
        seconds = launched.clock.seconds()
        self.prompt_budget.observe(seconds, launched.prompt_tokens, launched.decodes)
        self.scheduler.prompt_budget = self.prompt_budget.tokens

    @property
    def weight_copy_error(self) -> BaseException | None:
        """Why the load's weight copy failed (in its thread), once it has."""
        return self.weights_ready.error if self.weights_ready is not None else None

    @property
    def weights_copying(self) -> bool:
        """The load's weight copy is still running (its first step would wait for it)."""
        return self.weights_ready is not None and not self.weights_ready.query()

    @property
    def graph_buckets(self) -> GraphBuckets | None:
        """Which decode batch sizes replay a CUDA graph (None: this model has no graphs)."""
        return self.runner.graph_buckets

    def has_idle_work(self) -> bool:
        """Work for the worker's idle gaps is left (the step kernels' first run, then graphs
        to capture), and the load's weight copy is over: while it runs, the model's first
        request may be on its way, and work queued behind the copy would hold that request's
        first token back."""
        if self.settled:
            return False
        return not self.weights_copying

    def _graph_schedules(self) -> list[GraphBuckets]:
        """Decode graphs first, then those of steps with prompt tokens."""
        mixed = self.runner.mixed_graphs
        schedules = [self.runner.graph_buckets, mixed.buckets if mixed is not None else None]
        return [buckets for buckets in schedules if buckets is not None]

    def idle_work_priority(self) -> tuple[bool, bool, int, int]:
        """Which model's idle work goes first (smaller first): KV pages to map, kernels to
        warm, then decode graphs before prompt-step graphs, the smallest bucket first."""
        unmapped = self.runner.kv_region.unmapped_rows
        pending = [(i, b) for i, b in enumerate(self._graph_schedules()) if b.pending]
        if unmapped or not pending:
            return not unmapped, self.runner.step_kernels_warm, 0, 0
        schedule, buckets = pending[0]
        return True, self.runner.step_kernels_warm, schedule, buckets.next_size

    def do_idle_work(self) -> None:
        """One piece of idle-gap work: the KV pages the load took, mapped; the step kernels'
        first run; else the smallest bucket not captured yet (decode graphs first)."""
        self._finish_weight_copy()  # over already when the worker calls
        if self.runner.kv_region.unmapped_rows:
            self.runner.kv_region.map_taken_rows()
        elif not self.runner.step_kernels_warm:
            self.runner.warm_step_kernels()
        else:
            next(b for b in self._graph_schedules() if b.pending).capture_next()

    @property
    def settled(self) -> bool:
        """No idle-gap work is left: from now on no request waits for a compile or a capture
        (also true for a model that has none: on a CPU, or in a tensor-parallel group)."""
        if self.runner.kv_region.unmapped_rows:
            return False
        schedules = self._graph_schedules()
        if not schedules:
            return True
        return self.runner.step_kernels_warm and not any(b.pending for b in schedules)

    def capture_overdue_graph(self) -> bool:
        """Between two steps of a model under steady traffic: captures the bucket of a step
        size that ran eagerly too often to wait for an idle gap (see graph_buckets)."""
        for buckets in self._graph_schedules():
            bucket = buckets.overdue()
            if bucket is not None:
                self._finish_weight_copy()
                buckets.capture_bucket(bucket)
                return True
        return False

    def _finish_weight_copy(self) -> None:
        """A capture must not record the load's copy stream: the copy is waited for first."""
        if self.weights_ready is not None:
            self.weights_ready.synchronize()
            self.weights_ready = None

    def follow_step(self, inputs: StepInputs) -> None:
        """Non-lead tensor-parallel ranks: one step of the lead's."""
        if self.weights_ready is not None:  # the load's copy runs on the copy stream
            self.weights_ready.order_before(torch.cuda.current_stream(self.runner.device))
            self.weights_ready = None
        self.runner.run_followed(inputs)

    def close(self) -> None:
        """Frees the weights and hands the KV cache's pages back to the pool."""
        if self.in_flight is not None:  # its kernels still read the weights and the cache
            self.in_flight.wait()
            self.in_flight = None
        self.runner.close()
        if self.kv_pool is not None:
            self.kv_pool.drop_claim(self.kv_owner)
            if self.owns_kv_pool:  # nobody else maps its pages: the driver gets them
                self.kv_pool.release_all_idle()
        if self.skeleton is not None:
            SKELETONS.keep(self.skeleton_key, self.skeleton)
            self.skeleton = None
        self.runner = None
        self.sequences.clear()
        self.generators.clear()
        if self.structured_outputs is not None:
            self.structured_outputs.close()
            self.structured_outputs = None
        # The model holds no reference cycles, so its memory is back in the caching allocator
        # now; the owner decides when the driver gets it (torch.cuda.empty_cache).

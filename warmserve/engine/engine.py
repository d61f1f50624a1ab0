"""One deployment's inference engine: scheduler + block manager + model runner, stepped by the
worker that holds the model (the lead rank with tensor parallelism)."""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from warmserve.config import DTYPE_ITEMSIZE, EngineConfig, SamplingParams
from warmserve.engine.arena import bindable, default_dtype, model_on_arena
from warmserve.engine.block_manager import BlockManager
from warmserve.engine.graph_buckets import GraphBuckets
from warmserve.engine.kv_pool import InsufficientMemory, KVPool
from warmserve.engine.kv_region import KVRegion
from warmserve.engine.model_runner import ModelRunner
from warmserve.engine.scheduler import Scheduler, SchedulerLimits
from warmserve.engine.sequence import Sequence
from warmserve.engine.skeletons import SKELETONS, Skeleton
from warmserve.engine.weight_copy import WeightCopy
from warmserve.layers import parallel
from warmserve.loader.checkpoint import Checkpoint, CheckpointError, read_json
from warmserve.loader.gguf_tokenizer import tokenizer_json
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.loader.tensors import iter_checkpoint_tensors
from warmserve.models.config import ModelConfig
from warmserve.models.memory_plan import kv_block_bytes, plan_memory
from warmserve.models.registry import model_class
from warmserve.models.weights import WeightLoadError, parameter_slots
from warmserve.protocol import StepInputs, TokenOutput

if TYPE_CHECKING:
    from warmserve.engine.structured_output import StructuredOutputs

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}


class RequestRejected(ValueError):
    """A request that this model cannot take (too long, bad token ids, duplicate id)."""


def resolve_dtype(dtype: str, checkpoint_dtype: str | None) -> torch.dtype:
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    return TORCH_DTYPES.get(checkpoint_dtype or "float32", torch.float32)


def eos_token_ids(model_dir: Path, raw_config: dict) -> list[int]:
    ids: list[int] = []
    generation_config = model_dir / "generation_config.json"
    sources = [raw_config] + ([read_json(generation_config)] if generation_config.is_file() else [])
    for source in sources:
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


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

    @classmethod
    def create(
        cls,
        raw_config: dict,
        weights: SegmentWeights | Iterable[tuple[str, torch.Tensor]] | None,
        *,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        max_model_len: int | None = None,
        engine_config: EngineConfig = EngineConfig(),
        memory_budget_bytes: int | None = None,
        eos_token_ids: Iterable[int] = (),
        tokenizer_dir: Path | None = None,
        group: parallel.TensorParallelGroup = parallel.SINGLE,
        send_step: Callable[[StepInputs], None] | None = None,
        kv_pool: KVPool | None = None,
        kv_owner: object = None,
    ) -> Engine:
        """Builds the model on `device` with `weights` (checkpoint tensors, a host-store segment,
        or None for random weights: the worker's warm-up model) and its KV region in `kv_pool`
        (the worker's; None: a pool of its own, within `memory_budget_bytes`), where the
        weights and activations are claimed under `kv_owner`. `memory_budget_bytes` bounds
        the largest cache the model may grow to. `tokenizer_dir` (a folder or a GGUF file) has
        the tokenizer that structured output needs. A tensor-parallel rank builds its shard for
        `group`; the lead sends each step to the other ranks with `send_step`."""
        try:
            with parallel.building(group):
                engine = cls._build(
                    raw_config,
                    weights,
                    device=device,
                    dtype=dtype,
                    max_model_len=max_model_len,
                    engine_config=engine_config,
                    memory_budget_bytes=memory_budget_bytes,
                    eos_token_ids=eos_token_ids,
                    send_step=send_step,
                    kv_pool=kv_pool,
                    kv_owner=kv_owner,
                )
        except BaseException as error:
            # The frames in the error's traceback hold the half-built model: its weights would
            # stay allocated for as long as anyone holds the error (the worker holds it while it
            # frees memory and reports the failure).
            traceback.clear_frames(error.__traceback__)
            raise
        engine.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        return engine

    @classmethod
    def _build(
        cls,
        raw_config: dict,
        weights: SegmentWeights | Iterable[tuple[str, torch.Tensor]] | None,
        *,
        device: torch.device | str,
        dtype: str,
        max_model_len: int | None,
        engine_config: EngineConfig,
        memory_budget_bytes: int | None,
        eos_token_ids: Iterable[int],
        send_step: Callable[[StepInputs], None] | None,
        kv_pool: KVPool | None,
        kv_owner: object,
    ) -> Engine:
        started = time.perf_counter()
        device = torch.device(device)
        architecture = model_class(raw_config)
        config = ModelConfig.from_dict(raw_config)
        torch_dtype = resolve_dtype(dtype, config.torch_dtype)
        skeleton_key, skeleton = None, None
        phases: dict[str, float] = {}
        weights_ready = None
        if isinstance(weights, SegmentWeights) and bindable(weights, torch_dtype):
            skeleton_key = (
                architecture.__name__,
                json.dumps(raw_config, sort_keys=True),
                str(torch_dtype),
                parallel.tp_rank(),
                parallel.tp_world_size(),
            )
            skeleton, weights_ready = model_on_arena(
                architecture, config, weights, device, torch_dtype, skeleton_key, phases
            )
            model = skeleton.model
        else:
            with torch.device(device), default_dtype(torch_dtype):
                model = architecture(config)
            if weights is None:
                for param in model.parameters():
                    param.normal_(0.0, 0.02)
            else:
                tensors = weights.tensors() if isinstance(weights, SegmentWeights) else weights
                model.load_weights(tensors)
            model.to(device)  # buffers built on the CPU (rotary frequencies)
        weights_done = time.perf_counter()
        weights_bytes = sum(
            module._parameters[name].nbytes for module, name in parameter_slots(model).values()
        )
        attention = model.attention_layers()[0]
        block_size = engine_config.block_size
        memory = plan_memory(
            config,
            engine_config,
            weights_bytes=weights_bytes,
            itemsize=torch_dtype.itemsize,
            block_bytes=kv_block_bytes(
                len(model.attention_layers()),
                attention.num_kv_heads,
                attention.head_dim,
                block_size,
                torch_dtype.itemsize,
            ),
            max_model_len=max_model_len,
            budget_bytes=memory_budget_bytes,
        )
        # Every rank's cache must hold the block ids that the lead's scheduler hands out, and
        # the ranks agree before any of them may refuse, or the others would wait for it.
        group = parallel.current_group()
        max_blocks = group.smallest(memory.max_blocks)
        limit = group.smallest(memory.max_model_len)
        if max_blocks < 1:
            raise InsufficientMemory(
                f"no memory left for the KV cache: weights take {weights_bytes / 2**20:.0f} MiB "
                f"of a {(memory_budget_bytes or 0) / 2**20:.0f} MiB budget"
            )
        owns_kv_pool = kv_pool is None
        if kv_pool is None:
            kv_pool = KVPool.for_device(device, memory_budget_bytes)
        kv_owner = kv_owner if kv_owner is not None else object()
        claimed = kv_pool.claim(kv_owner, weights_bytes + memory.activation_bytes)
        if not group.smallest(int(claimed)):
            kv_pool.drop_claim(kv_owner)
            where = " on another rank of its group" if claimed else ""
            raise InsufficientMemory(
                "the other models' KV blocks in use leave too little memory for "
                f"{(weights_bytes + memory.activation_bytes) / 2**20:.0f} MiB of weights and "
                f"activations{where}"
            )
        region = None
        try:
            region = KVRegion(
                kv_pool,
                num_layers=len(model.attention_layers()),
                block_size=block_size,
                num_kv_heads=attention.num_kv_heads,
                head_dim=attention.head_dim,
                dtype=torch_dtype,
                # One block more than the plan's: the scratch block.
                max_blocks=max_blocks + 1,
                min_blocks=min(memory.min_blocks, max_blocks) + 1,
                device=device,
            )
            runner = ModelRunner(
                model, device, block_size, region, engine_config.max_num_seqs, limit, send_step
            )
        except BaseException:
            if region is not None:
                region.release()
            kv_pool.drop_claim(kv_owner)
            raise
        limits = SchedulerLimits(
            max_num_seqs=engine_config.max_num_seqs,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            max_prefill_tokens_beside_decodes=engine_config.max_prefill_tokens_beside_decodes,
            max_model_len=limit,
        )
        block_manager = BlockManager(
            region.num_blocks, block_size, grow=region.grow, scratch_block=True
        )
        if runner.is_lead:
            region.block_manager = block_manager
        # else: the lead's block manager decides which blocks hold data; without one of its own
        # the region never gives up a page (it grows when the lead's steps say so).
        scheduler = Scheduler(limits, block_manager, eos_token_ids)
        engine = cls(config, runner, scheduler, weights_bytes)
        engine.activation_bytes = memory.activation_bytes
        engine.kv_pool, engine.kv_owner = kv_pool, kv_owner
        engine.owns_kv_pool = owns_kv_pool
        engine.skeleton_key, engine.skeleton = skeleton_key, skeleton
        engine.weights_ready = weights_ready
        engine.load_phases = {
            **phases,
            "weights_s": weights_done - started,
            "kv_cache_s": time.perf_counter() - weights_done,
        }
        return engine

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> Engine:
        """Loads a checkpoint folder from disk; every failure is a CheckpointError naming the
        file and the problem."""
        checkpoint = Checkpoint(path)
        try:
            model_class(checkpoint.config)
            ModelConfig.from_dict(checkpoint.config)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{checkpoint.path / 'config.json'}: {exc}") from None
        try:
            return cls.create(
                checkpoint.config,
                iter_checkpoint_tensors(checkpoint),
                eos_token_ids=eos_token_ids(checkpoint.path, checkpoint.config),
                tokenizer_dir=checkpoint.path,
                **kwargs,
            )
        except WeightLoadError as exc:
            info = checkpoint.tensors.get(exc.tensor_name) if exc.tensor_name else None
            where = info.file if info else str(checkpoint.path)
            raise CheckpointError(f"{where}: {exc}") from None
        finally:
            gc.collect()

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
        return self.scheduler.has_unfinished() or bool(compiling)

    def step(self) -> list[TokenOutput]:
        if self.structured_outputs is not None:
            for request_id, error in self.structured_outputs.admit_compiled(self.scheduler):
                self._forget(request_id)
                self.failures.append((request_id, error))
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        if self.weights_ready is not None:  # the load's copy runs on the copy stream
            self.weights_ready.order_before(torch.cuda.current_stream(self.runner.device))
            self.weights_ready = None
        generators = [self.generators.get(seq.request_id) for seq in seqs]
        sampled = self.runner.execute(
            seqs, generators, self.scheduler.eos_token_ids, self.structured_outputs
        )
        sampling = [seq for seq in seqs if seq.samples_this_step]
        if self.structured_outputs is not None:
            self.structured_outputs.accept(sampling, sampled.token_ids)
        tokens = iter(sampled.token_ids)
        self.scheduler.finish_step(
            seqs, [next(tokens) if seq.samples_this_step else None for seq in seqs]
        )
        outputs = []
        for seq, token, token_logprobs, prompt_logprobs in zip(
            sampling, sampled.token_ids, sampled.logprobs, sampled.prompt_logprobs, strict=True
        ):
            outputs.append(
                TokenOutput(
                    seq.request_id, token, seq.finish_reason, token_logprobs, prompt_logprobs
                )
            )
            if seq.finish_reason is not None:
                self._forget(seq.request_id)
        return outputs

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
        """Work for the worker's idle gaps is left (the step kernels' first run, then decode
        graphs to capture), and the load's weight copy is over: while it runs, the model's
        first request may be on its way, and work queued behind the copy would hold that
        request's first token back."""
        if self.settled:
            return False
        return not self.weights_copying

    def idle_work_priority(self) -> tuple[bool, int]:
        """Which model's idle work goes first (smaller first): kernels to warm, then the
        smallest decode bucket still to capture."""
        return self.runner.step_kernels_warm, self.runner.graph_buckets.next_size or 0

    def do_idle_work(self) -> None:
        """One piece of idle-gap work: the step kernels' first run, else the smallest decode
        bucket not captured yet."""
        self._finish_weight_copy()  # over already when the worker calls
        if not self.runner.step_kernels_warm:
            self.runner.warm_step_kernels()
        else:
            self.runner.graph_buckets.capture_next()

    @property
    def settled(self) -> bool:
        """No idle-gap work is left: from now on no request waits for a compile or a capture
        (also true for a model that has none: on a CPU, or in a tensor-parallel group)."""
        buckets = self.runner.graph_buckets
        return buckets is None or (self.runner.step_kernels_warm and not buckets.pending)

    def capture_overdue_graph(self) -> bool:
        """Between two steps of a model under steady traffic: captures the bucket of a decode
        batch size that ran eagerly too often to wait for an idle gap (see graph_buckets)."""
        buckets = self.runner.graph_buckets
        bucket = buckets.overdue() if buckets is not None else None
        if bucket is None:
            return False
        self._finish_weight_copy()
        buckets.capture_bucket(bucket)
        return True

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

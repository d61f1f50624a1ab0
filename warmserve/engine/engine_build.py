"""Building an engine: the model on its device with its weights (bound to a host-store segment,
or copied from checkpoint tensors), its memory plan, its KV region in the pool, and the scheduler
over them."""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from warmserve.config import DTYPE_ITEMSIZE, ConfigError, EngineConfig
from warmserve.engine.arena import bindable, default_dtype, model_on_arena
from warmserve.engine.block_manager import BlockManager
from warmserve.engine.engine import Engine
from warmserve.engine.kv_pool import InsufficientMemory, KVPool
from warmserve.engine.kv_region import KVRegion
from warmserve.engine.model_runner import ModelRunner
from warmserve.engine.prompt_budget import PromptBudget
from warmserve.engine.scheduler import Scheduler, SchedulerLimits
from warmserve.layers import parallel
from warmserve.layers.batch_invariance import set_batch_invariant
from warmserve.loader.checkpoint import Checkpoint, CheckpointError, read_json
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.loader.tensors import iter_checkpoint_tensors
from warmserve.models.config import ModelConfig
from warmserve.models.memory_plan import kv_block_bytes, plan_memory
from warmserve.models.registry import model_class
from warmserve.models.weights import WeightLoadError, parameter_slots
from warmserve.protocol import StepInputs

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}


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


def build_engine(
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
            engine = _build(
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


def _build(
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
    check_batch_invariance(engine_config, device)
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
    set_batch_invariant(model, engine_config.batch_invariant)  # a reused skeleton's too
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
            model,
            device,
            block_size,
            region,
            engine_config.max_num_seqs,
            limit,
            engine_config.max_num_batched_tokens,
            send_step,
        )
    except BaseException:
        if region is not None:
            region.release()
        kv_pool.drop_claim(kv_owner)
        raise
    limits = SchedulerLimits(
        max_num_seqs=engine_config.max_num_seqs,
        max_num_batched_tokens=engine_config.max_num_batched_tokens,
        prefill_tokens_beside_decodes=engine_config.prefill_tokens_beside_decodes,
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
    engine = Engine(config, runner, scheduler, weights_bytes)
    engine.activation_bytes = memory.activation_bytes
    engine.async_scheduling = (
        engine_config.async_scheduling
        if engine_config.async_scheduling is not None
        else device.type == "cuda"
    )
    # A budget that keeps such steps within the largest prompt-step graph: past it they would
    # run eagerly, several times slower for a small model.
    ceiling = engine_config.max_num_batched_tokens
    if runner.mixed_graphs is not None:
        graphed = runner.mixed_graphs.buckets.sizes[-1] - engine_config.max_num_seqs
        ceiling = max(scheduler.prompt_budget, min(ceiling, graphed))
    engine.prompt_budget = PromptBudget(
        scheduler.prompt_budget, ceiling, engine_config.prompt_step_time_ratio
    )
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


def check_batch_invariance(engine_config: EngineConfig, device: torch.device) -> None:
    if not engine_config.batch_invariant:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"batch-invariant mode needs a CUDA device (its kernels are Triton's), not {device}"
        )
    if parallel.current_group().size > 1:
        # An all-reduce's order of summation depends on the size of what it reduces.
        raise ConfigError("batch-invariant mode does not cover tensor parallelism")


def engine_from_checkpoint(path: str | Path, **kwargs) -> Engine:
    """Loads a checkpoint folder from disk; every failure is a CheckpointError naming the
    file and the problem."""
    checkpoint = Checkpoint(path)
    try:
        model_class(checkpoint.config)
        ModelConfig.from_dict(checkpoint.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: {exc}") from None
    try:
        return build_engine(
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

"""Running engines to completion in tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine import Engine
from warmserve.engine.engine_build import engine_from_checkpoint

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def make_engine(path, max_model_len: int = 256, **engine_config) -> Engine:
    engine = engine_from_checkpoint(
        path,
        engine_config=EngineConfig(**engine_config),
        max_model_len=max_model_len,
        dtype="float32",
    )
    # A new cache holds whatever its memory held before; NaN makes any read of a slot that was
    # never written show up in the outputs.
    for k_cache, v_cache in engine.kv_region.layer_caches:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    return engine


def collect(completions: dict[str, Completion], outputs) -> None:
    for output in outputs:
        completion = completions.setdefault(output.request_id, Completion())
        assert completion.finish_reason is None, f"{output.request_id} produced after finishing"
        completion.token_ids.append(output.token_id)
        completion.finish_reason = output.finish_reason


def run_to_completion(
    engine: Engine, completions: dict[str, Completion] | None = None, max_steps: int = 10_000
) -> dict[str, Completion]:
    """Steps until every request finished; adds the outputs to `completions` (a new dict when
    None) and returns it."""
    completions = {} if completions is None else completions
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return completions
        collect(completions, engine.step())
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def generate_alone(engine: Engine, prompt: list[int], params: SamplingParams) -> Completion:
    assert not engine.has_unfinished_requests()
    engine.add_request("alone", prompt, params)
    return run_to_completion(engine)["alone"]


def random_prompts(lengths, vocab_size: int = 512, seed: int = 0) -> list[list[int]]:
    """Token ids from 3 on: 0-2 are the fixture tokenizer's special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def assert_all_blocks_free(engine: Engine) -> None:
    manager = engine.scheduler.block_manager
    assert manager.num_used_blocks == 0
    assert manager.num_free_blocks == manager.num_blocks - manager.num_scratch_blocks
    assert all(block.ref_count == 0 for block in manager.blocks[manager.num_scratch_blocks :])


@dataclass(frozen=True)
class Scheduled:
    """A sequence as one step scheduled it."""

    request_id: str
    num_computed_tokens: int
    num_scheduled_tokens: int  # what the step computes: all its new tokens, or a prompt chunk
    num_output_tokens: int


def record_schedules(engine: Engine) -> list[list[Scheduled]]:
    """Wraps the engine's scheduler so that every step's batch is recorded as it was scheduled."""
    steps: list[list[Scheduled]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        steps.append(
            [
                Scheduled(
                    seq.request_id,
                    seq.num_computed_tokens,
                    seq.num_scheduled_tokens,
                    seq.num_output_tokens,
                )
                for seq in batch
            ]
        )
        return batch

    engine.scheduler.schedule = recording_schedule
    return steps

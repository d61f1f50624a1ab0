"""One deployment's own process group (gloo, two processes, no server): its ranks size their KV
caches alike even when each has its own memory figure, and when one rank has no room every
rank refuses the load, none waits for the others."""

from __future__ import annotations

import multiprocessing
import traceback

import torch
from server_process import free_port

from warmserve.config import EngineConfig
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.kv_pool import InsufficientMemory
from warmserve.engine.tensor_parallel import DeploymentGroup

KIB = 2**10


def build_rank(rank: int, init_method: str, path: str, kv_budgets: list[int], results) -> None:
    """Child process: forms the group, then builds its shard of the model once per KV budget
    (its own, which the other rank does not know), and reports for each build (KV blocks,
    context) or the error's type."""
    torch.set_num_threads(1)
    group = DeploymentGroup.form(init_method, rank, 2, torch.device("cpu"))
    outcomes = []
    try:
        for kv_bytes in kv_budgets:
            try:
                engine = engine_from_checkpoint(
                    path, group=group.group, engine_config=EngineConfig(kv_cache_bytes=kv_bytes)
                )
            except InsufficientMemory as exc:
                outcomes.append(type(exc).__name__)
                continue
            # The scratch block aside, as many blocks as its cache may ever hold.
            outcomes.append((engine.kv_region.max_blocks - 1, engine.max_model_len))
            engine.close()
    except Exception:
        traceback.print_exc()
    finally:
        results.put((rank, outcomes))
        group.close(barrier=True)


def run_ranks(path, kv_budgets: list[list[int]]) -> list[list]:
    """Each rank's outcomes, by rank."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ranks = [
        context.Process(target=build_rank, args=(rank, init_method, str(path), budgets, results))
        for rank, budgets in enumerate(kv_budgets)
    ]
    for process in ranks:
        process.start()
    outcomes = dict(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
    return [outcomes[rank] for rank in range(len(ranks))]


def test_ranks_agree_on_the_kv_cache_and_on_refusing(llama_path):
    rank0, rank1 = run_ranks(llama_path, [[256 * KIB, 256 * KIB], [64 * KIB, 0]])
    assert rank0[0] == rank1[0]
    blocks, _ = rank1[0]
    alone = engine_from_checkpoint(llama_path, engine_config=EngineConfig(kv_cache_bytes=64 * KIB))
    # Each rank holds half the KV heads: the smaller budget holds twice one worker's blocks.
    assert blocks == 2 * (alone.kv_region.max_blocks - 1)
    alone.close()
    # One rank has no room: both refuse, neither waits for the other.
    assert rank0[1] == rank1[1] == InsufficientMemory.__name__

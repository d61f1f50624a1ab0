"""Batch-invariant mode (EngineConfig.batch_invariant, `--batch-invariant`): its kernels are
Triton's, so here (no GPU) stand-ins with the kernels' signatures check that every projection
and every attention of a model takes the batch-invariant path, and that the mode is refused
where it cannot run. scripts/batch_invariance_check.py checks the kernels themselves on a GPU:
greedy bf16 tokens equal alone and among 56 other requests."""

from __future__ import annotations

import itertools
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import collect, make_engine, random_prompts, run_to_completion
from server_process import REPO_ROOT, subprocess_env

from warmserve.config import ConfigError, EngineConfig, SamplingParams
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.layers.attention import AttentionMetadata, PagedAttention, paged_prefill_reference
from warmserve.layers.batch_invariance import set_batch_invariant
from warmserve.layers.linear import LinearBase
from warmserve.layers.vocab import VocabParallelEmbedding


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """The two Triton modules of the mode, replaced by the torch reference; records each call."""
    calls = {"linear": [], "attention": []}

    def invariant_linear(x, weight, bias=None):
        calls["linear"].append(weight.data_ptr())
        return F.linear(x, weight, bias)

    def paged_prefill_kernel(
        q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len, scale,
        sliding_window=None, *, rows=None,
    ):  # fmt: skip
        starts = query_start.tolist()
        query_lens = [end - start for start, end in itertools.pairwise(starts)]
        calls["attention"].append((rows, query_lens))
        meta = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long),
            query_lens=query_lens,
            context_lens=context_lens,
            context_lens_host=context_lens.tolist(),
            block_tables=block_tables,
            max_context_len=int(context_lens.max()),
            decode_only=False,
            query_start=query_start,
        )
        return paged_prefill_reference(q, k_cache, v_cache, meta, scale, sliding_window)

    matmul = types.ModuleType("warmserve.layers.triton_matmul")
    matmul.invariant_linear = invariant_linear
    prefill = types.ModuleType("warmserve.layers.triton_prefill")
    prefill.INVARIANT_ROWS = 64
    prefill.paged_prefill_kernel = paged_prefill_kernel
    monkeypatch.setitem(sys.modules, "warmserve.layers.triton_matmul", matmul)
    monkeypatch.setitem(sys.modules, "warmserve.layers.triton_prefill", prefill)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_every_projection_and_attention_takes_the_batch_invariant_path(
    checkpoint_factory, stand_in_kernels, family
):
    engine = make_engine(checkpoint_factory(family), max_num_batched_tokens=32)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = random_prompts([3, 50, 9])

    def completions():
        engine.add_request("0", prompts[0], greedy)
        engine.add_request("1", prompts[1], greedy)
        completions = {}
        collect(completions, engine.step())
        engine.add_request("2", prompts[2], greedy)  # a prompt beside decodes
        return {key: c.token_ids for key, c in run_to_completion(engine, completions).items()}

    default = completions()
    assert stand_in_kernels == {"linear": [], "attention": []}
    model = engine.runner.model
    set_batch_invariant(model, True)
    assert completions() == default  # the stand-ins compute what the default path does
    linear = {m.weight.data_ptr() for m in model.modules() if isinstance(m, LinearBase)}
    vocab = {m.weight.data_ptr() for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
    called = set(stand_in_kernels["linear"])
    # Every linear layer, and the head that gives the logits (the embedding where tied).
    assert linear <= called and len(called - linear) == 1 and called - linear <= vocab
    layers = len([m for m in model.modules() if isinstance(m, PagedAttention)])
    query_lens = [lens for _, lens in stand_in_kernels["attention"]]
    assert {rows for rows, _ in stand_in_kernels["attention"]} == {64}
    # Prompts (the second run's from the prefix cache), a prompt beside decodes, decodes alone.
    assert [3, 2] in query_lens and [1, 1, 9] in query_lens and [1, 1, 1] in query_lens
    assert len(query_lens) % layers == 0
    set_batch_invariant(model, False)
    stand_in_kernels["linear"].clear()
    assert completions() == default and not stand_in_kernels["linear"]
    engine.close()


def test_an_engine_refuses_batch_invariance_off_a_gpu(llama_path):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        engine_from_checkpoint(
            llama_path, dtype="float32", engine_config=EngineConfig(batch_invariant=True)
        )


def test_serve_refuses_batch_invariance_on_cpu_workers():
    served = subprocess.run(
        [sys.executable, "-m", "warmserve", "serve", "--device", "cpu", "--port", "0",
         "--batch-invariant"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO_ROOT,
        timeout=60,
    )  # fmt: skip
    assert served.returncode == 1
    assert "--batch-invariant needs GPU workers" in served.stderr

"""Steps with prompt tokens replayed from CUDA graphs (engine/mixed_graphs.py): the graph itself
is scripts/gpu_check.py's to check (greedy output equal to transformers and to eager steps);
here, on the CPU, how a step is padded up to its bucket, that the padded forward (what a graph
captures) gives each sequence the eager step's logits, and which steps get a graph."""

from __future__ import annotations

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.block_manager import SCRATCH_BLOCK
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.mixed_graphs import TOKEN_BUCKETS, MixedGraphs
from warmserve.protocol import StepInputs


def mixed_graphs(max_tokens: int = 64) -> MixedGraphs:
    graphs = MixedGraphs(None, torch.device("cpu"), 4, max_tokens, 6, 4, SCRATCH_BLOCK, None)
    graphs.inputs.host = torch.zeros_like(graphs.static)  # what the first capture pins
    return graphs


def staged_step(graphs: MixedGraphs, staging: torch.Tensor):
    host = staging.numpy()
    tokens = graphs.tokens
    rows = host[: 3 * tokens].reshape(3, tokens)
    per_seq = host[3 * tokens : graphs.vectors]
    context, last, starts = per_seq[:4], per_seq[4:8], per_seq[8:]
    tables = host[graphs.vectors :].reshape(4, 6)
    return rows, context, last, starts, tables


def test_buckets_go_up_to_the_largest_graphed_step():
    assert mixed_graphs(4096).buckets.sizes == list(TOKEN_BUCKETS)
    assert mixed_graphs(300).buckets.sizes == [32, 64, 128, 256, 300]


def test_a_step_is_padded_with_sequences_without_queries_and_tokens_in_the_scratch_block():
    graphs = mixed_graphs()
    chunk_table, decode_table = [3, 4], [5]
    inputs = StepInputs(
        input_ids=[11, 12, 13, 14, 15, 21],
        positions=[2, 3, 4, 5, 6, 2],
        slot_mapping=[14, 15, 16, 17, 18, 22],
        query_lens=[5, 1],
        context_lens=[7, 3],
        block_tables=[chunk_table, decode_table],
    )
    used = graphs.stage(inputs, 32)
    rows, context, last, starts, tables = staged_step(graphs, graphs.inputs.host)
    assert rows[0, :6].tolist() == inputs.input_ids and rows[1, :6].tolist() == inputs.positions
    assert rows[2, :6].tolist() == inputs.slot_mapping
    # Padding tokens up to the bucket: id 0 at position 0, written into the scratch block.
    assert set(rows[0, 6:32]) == {0} and set(rows[1, 6:32]) == {0}
    assert set(rows[2, 6:32]) == {SCRATCH_BLOCK * 4}
    assert context.tolist() == [7, 3, 1, 1]
    assert last.tolist() == [4, 5, 0, 0]  # each sequence's last row; padding reads row 0
    # Query starts: the padding sequences start where the real tokens end, with no queries.
    assert starts.tolist() == [0, 5, 6, 6, 6]
    assert tables[0, :2].tolist() == chunk_table and tables[1, :1].tolist() == decode_table
    assert used == graphs.vectors + 2 * 6  # the real sequences' table rows cross, no more


def test_a_running_sequence_writes_only_its_new_blocks():
    graphs = mixed_graphs()
    table = [3]
    step = dict(positions=[0], slot_mapping=[12], query_lens=[1], context_lens=[1])
    graphs.stage(StepInputs(input_ids=[7], block_tables=[table], **step), 32)
    *_, tables = staged_step(graphs, graphs.inputs.host)
    tables[0, 0] = -1  # were the row written again, this would be overwritten
    table.append(9)
    graphs.stage(StepInputs(input_ids=[8], block_tables=[table], **step), 32)
    assert tables[0, :2].tolist() == [-1, 9]
    graphs.stage(StepInputs(input_ids=[8], block_tables=[[4, 5]], **step), 32)  # another sequence
    assert tables[0, :2].tolist() == [4, 5]


def test_steps_that_score_prompt_rows_or_exceed_the_buckets_run_eagerly():
    graphs = mixed_graphs()
    graphs.buckets.capture = lambda bucket: None
    graphs.buckets.capture_next(), graphs.buckets.capture_next()
    step = dict(positions=[0, 1], slot_mapping=[0, 1], query_lens=[2], context_lens=[2])
    assert graphs.fits(StepInputs(input_ids=[1, 2], block_tables=[[1]], **step)) == 32
    scored = StepInputs(input_ids=[1, 2], block_tables=[[1]], prompt_rows=[0], **step)
    assert graphs.fits(scored) is None
    long = dict(positions=list(range(65)), slot_mapping=list(range(65)), query_lens=[65])
    too_long = StepInputs(input_ids=[1] * 65, block_tables=[[1] * 17], context_lens=[65], **long)
    assert graphs.fits(too_long) is None


def padded_and_eager_logits(engine, bucket: int):
    """The logits of the engine's next step run eagerly, and padded to `bucket` tokens and
    `max_num_seqs` sequences as its graph would run it (the captured forward, called directly:
    the CPU has no graphs)."""
    runner = engine.runner
    seqs = engine.scheduler.schedule()
    inputs = runner.build_inputs(seqs)
    eager, _ = runner._forward(inputs)
    graphs = MixedGraphs(
        runner.model,
        torch.device("cpu"),
        engine.scheduler.limits.max_num_seqs,
        64,
        -(-engine.max_model_len // runner.block_size),
        runner.block_size,
        SCRATCH_BLOCK,
        None,
    )
    graphs.inputs.host = torch.zeros_like(graphs.static)
    used = graphs.stage(inputs, bucket)
    graphs.static[:used] = graphs.inputs.host[:used]  # the step's copy to the device
    graphs._forward(bucket)
    return inputs, eager, graphs.logits[: len(seqs)]


def test_a_padded_step_gives_each_sequence_the_logits_of_the_eager_step(checkpoint_factory):
    """A prompt chunk beside two decodes, padded to 64 tokens and 4 sequences: the padding
    tokens (written into the scratch block) and the padding sequences (no queries) change no
    real row; likewise a lone prompt, which eagerly takes the dense path."""
    engine = engine_from_checkpoint(
        checkpoint_factory("llama"),
        dtype="float32",
        engine_config=EngineConfig(max_num_seqs=4),
        max_model_len=128,
    )
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("alone", list(range(30, 50)), greedy)
    inputs, eager, padded = padded_and_eager_logits(engine, 32)
    assert inputs.query_lens == [20]
    torch.testing.assert_close(padded, eager)
    engine.step()
    engine.add_request("second", [5, 6, 7], greedy)
    engine.step()
    engine.add_request("chunk", list(range(60, 85)), greedy)  # beside two decodes
    inputs, eager, padded = padded_and_eager_logits(engine, 64)
    assert sorted(inputs.query_lens) == [1, 1, 25]
    torch.testing.assert_close(padded, eager)
    assert padded.argmax(-1).tolist() == eager.argmax(-1).tolist()
    engine.close()

"""The scheduler alone, with a fake model: each step's outputs are made-up token ids."""

from __future__ import annotations

import pytest

from warmserve.config import SamplingParams
from warmserve.engine.block_manager import BlockManager
from warmserve.engine.scheduler import Scheduler, SchedulerLimits
from warmserve.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus

BLOCK_SIZE = 4
EOS = 2
FILLER = 7  # a token id that ends nothing


def finish_step(scheduler: Scheduler, batch, token_ids):
    """The step launched and resolved at once, as the engine without asynchronous scheduling."""
    return scheduler.resolve(batch, scheduler.commit(batch), token_ids)


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 128,
) -> Scheduler:
    limits = SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len)
    return Scheduler(limits, BlockManager(num_blocks, BLOCK_SIZE), eos_token_ids=[EOS])


def make_seq(request_id: str, prompt_len: int, **params) -> Sequence:
    # Distinct tokens per request, so that no prefix is shared by accident.
    start = 1000 * (1 + sum(map(ord, request_id)))
    params.setdefault("max_tokens", 100)
    return Sequence(request_id, list(range(start, start + prompt_len)), SamplingParams(**params))


def step(scheduler: Scheduler, token_id: int = FILLER) -> list[Sequence]:
    """One engine step with a model that outputs `token_id` for every sequence."""
    batch = scheduler.schedule()
    finish_step(scheduler, batch, [token_id] * len(batch))
    return batch


def test_decodes_and_prefills_share_a_step():
    scheduler = make_scheduler()
    first = make_seq("first", 6)
    scheduler.add(first)
    assert scheduler.schedule() == [first]
    assert first.num_new_tokens == 6
    finish_step(scheduler, [first], [FILLER])

    second = make_seq("second", 5)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch == [first, second]
    assert (first.num_new_tokens, second.num_new_tokens) == (1, 5)
    finish_step(scheduler, batch, [FILLER, FILLER])
    assert first.output_token_ids == [FILLER, FILLER]
    assert second.output_token_ids == [FILLER]
    assert first.num_computed_tokens == 7


def test_admission_stops_at_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"seq-{index}", 3) for index in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.schedule() == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]


def test_a_prompt_beyond_the_token_budget_is_prefilled_in_chunks_in_arrival_order():
    scheduler = make_scheduler(max_num_batched_tokens=9)
    long_first = make_seq("long", 6)
    longer = make_seq("longer", 7)
    short = make_seq("short", 2)
    for seq in (long_first, longer, short):
        scheduler.add(seq)
    # 6 + 7 > 9: the second starts with a chunk of 3, and the short third does not overtake it.
    batch = scheduler.schedule()
    assert batch == [long_first, longer]
    assert (long_first.num_scheduled_tokens, longer.num_scheduled_tokens) == (6, 3)
    assert [seq.samples_this_step for seq in batch] == [True, False]
    finish_step(scheduler, batch, [FILLER, None])
    assert (long_first.output_token_ids, longer.output_token_ids) == ([FILLER], [])
    assert longer.num_computed_tokens == 3 and list(scheduler.waiting) == [short]
    # The decode goes first (1), then the rest of the chunked prompt (4), then the short one.
    batch = scheduler.schedule()
    assert batch == [long_first, longer, short]
    assert [seq.num_scheduled_tokens for seq in batch] == [1, 4, 2]
    assert all(seq.samples_this_step for seq in batch)


def test_decodes_are_scheduled_before_prompt_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    early = make_seq("early", 3)
    scheduler.add(early)
    step(scheduler)
    late = make_seq("late", 20)
    scheduler.add(late)
    for expected_chunk in (3, 3, 3):
        batch = scheduler.schedule()
        assert batch == [early, late] and late.num_scheduled_tokens == expected_chunk
        assert early.num_scheduled_tokens == 1
        finish_step(scheduler, batch, [FILLER, None])
    assert late.num_computed_tokens == 9 and early.num_output_tokens == 4


def test_a_prompt_whose_tokens_are_scored_is_never_chunked():
    scheduler = make_scheduler(max_num_batched_tokens=9)
    scheduler.add(make_seq("first", 6))
    scored = make_seq("scored", 7, prompt_logprobs=1)
    scheduler.add(scored)
    batch = scheduler.schedule()
    assert scored not in batch  # 6 + 7 > 9: it waits for a step with room for all of it
    finish_step(scheduler, batch, [FILLER])
    assert scored in scheduler.schedule() and scored.num_scheduled_tokens == 7


def test_a_step_that_decodes_carries_few_prompt_tokens_one_without_decodes_many():
    limits = SchedulerLimits(8, 256, 128, prefill_tokens_beside_decodes=8)
    scheduler = Scheduler(limits, BlockManager(64, BLOCK_SIZE), eos_token_ids=[EOS])
    first, second = make_seq("first", 30), make_seq("second", 30)
    scheduler.add(first)
    scheduler.add(second)
    batch = step(scheduler)  # no stream decodes yet: both prompts whole
    assert batch == [first, second]
    assert [seq.num_scheduled_tokens for seq in batch] == [30, 30]
    third, fourth = make_seq("third", 30), make_seq("fourth", 30)
    scheduler.add(third)
    scheduler.add(fourth)
    batch = step(scheduler)  # two streams decode: 8 prompt tokens beside them
    assert [(seq.request_id, seq.num_scheduled_tokens) for seq in batch] == [
        ("first", 1),
        ("second", 1),
        ("third", 8),
    ]
    batch = step(scheduler)
    assert [seq.num_scheduled_tokens for seq in batch] == [1, 1, 8]
    # A scored prompt cannot be chunked: beside decodes it still goes in whole.
    scored = make_seq("scored", 40, prompt_logprobs=1)
    scheduler.waiting.appendleft(scored)
    batch = scheduler.schedule()
    assert [(seq.request_id, seq.num_scheduled_tokens) for seq in batch] == [
        ("first", 1),
        ("second", 1),
        ("third", 8),
        ("scored", 40),
    ]


def test_the_prompt_budget_beside_decodes_is_the_engines_to_set():
    limits = SchedulerLimits(8, 256, 128, prefill_tokens_beside_decodes=8)
    scheduler = Scheduler(limits, BlockManager(64, BLOCK_SIZE), eos_token_ids=[EOS])
    assert scheduler.prompt_budget == 8
    first, second = make_seq("first", 30), make_seq("second", 30)
    scheduler.add(first)
    step(scheduler)
    scheduler.add(second)
    scheduler.prompt_budget = 12  # as the engine sets it from its step times
    batch = step(scheduler)
    assert [(seq.request_id, seq.num_scheduled_tokens) for seq in batch] == [
        ("first", 1),
        ("second", 12),
    ]


def test_admission_waits_for_free_blocks():
    scheduler = make_scheduler(num_blocks=3)
    first = make_seq("first", 8)  # 2 blocks
    second = make_seq("second", 8)
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.schedule() == [first]
    assert scheduler.waiting[0] is second


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_recomputed_later():
    scheduler = make_scheduler(num_blocks=4)
    older = make_seq("older", 4)
    newer = make_seq("newer", 4)
    for seq in (older, newer):
        scheduler.add(seq)
    step(scheduler)  # both prefilled, 1 block each; their fifth tokens need a second block
    step(scheduler)  # both get their second block: none left
    assert scheduler.block_manager.num_free_blocks == 0
    for _ in range(3):
        step(scheduler)
    assert (len(older), len(newer)) == (9, 9)  # both need a third block now

    batch = scheduler.schedule()
    assert batch == [older]
    assert scheduler.num_preemptions == 1
    assert newer.num_preemptions == 1
    assert newer.status is SequenceStatus.WAITING
    assert newer.block_table == []
    assert newer.num_computed_tokens == 0
    assert list(scheduler.waiting) == [newer]
    finish_step(scheduler, batch, [EOS])  # older finishes and frees its blocks

    # Recomputed with the generated tokens it keeps, all of them: older took the lowest free
    # block for its ninth token, which was newer's prompt block (no longer in the cache).
    assert scheduler.schedule() == [newer]
    assert newer.output_token_ids == [FILLER] * 5
    assert (newer.num_computed_tokens, newer.num_new_tokens) == (0, 9)


def test_a_lone_sequence_that_outgrows_the_cache_is_preempted_not_failed():
    scheduler = make_scheduler(num_blocks=2, max_model_len=8)
    seq = make_seq("alone", 4)
    scheduler.add(seq)
    while scheduler.has_unfinished():
        step(scheduler)
    assert seq.finish_reason == "length"
    assert len(seq) == 8


def test_no_sequence_is_admitted_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=2)
    older, newer = make_seq("older", 4), make_seq("newer", 4)
    scheduler.add(older)
    scheduler.add(newer)
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 0
    late = make_seq("late", 1)
    scheduler.add(late)
    # older needs a block for its fifth token: newer goes, and its freed block is not handed
    # to the waiting sequences in the same step.
    assert scheduler.schedule() == [older]
    assert list(scheduler.waiting) == [newer, late]


@pytest.mark.parametrize(
    ("params", "outputs", "expected_reason", "expected_len"),
    [
        ({}, [FILLER, EOS], "stop", 2),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], "length", 3),
        ({"stop_token_ids": (FILLER + 1,)}, [FILLER, FILLER + 1], "stop", 2),
        ({"stop_token_ids": (FILLER,), "ignore_eos": True}, [FILLER], "stop", 1),
        ({"max_tokens": 3}, [FILLER] * 3, "length", 3),
        ({"max_tokens": 1}, [FILLER], "length", 1),
    ],
    ids=["eos", "ignore-eos", "stop-token", "stop-token-despite-ignore-eos", "max-tokens", "one"],
)
def test_finish_reasons(params, outputs, expected_reason, expected_len):
    scheduler = make_scheduler()
    seq = make_seq("seq", 3, **params)
    scheduler.add(seq)
    for index, token_id in enumerate(outputs):
        step(scheduler, token_id)
        assert (seq.finish_reason is not None) == (index == len(outputs) - 1)
    assert seq.finish_reason == expected_reason
    assert seq.status is SequenceStatus.FINISHED
    assert seq.num_output_tokens == expected_len
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert not scheduler.has_unfinished()


def test_max_model_len_ends_a_sequence_whatever_max_tokens_says():
    scheduler = make_scheduler(max_model_len=10)
    seq = make_seq("seq", 7, max_tokens=50)
    scheduler.add(seq)
    for _ in range(3):
        step(scheduler)
    assert seq.finish_reason == "length"
    assert len(seq) == 10


def test_finish_step_returns_the_finished_sequences_and_frees_their_blocks():
    scheduler = make_scheduler(num_blocks=8)
    done, going = make_seq("done", 4, max_tokens=1), make_seq("going", 4)
    scheduler.add(done)
    scheduler.add(going)
    batch = scheduler.schedule()
    assert finish_step(scheduler, batch, [FILLER, FILLER]) == [done]
    assert scheduler.running == [going]
    assert scheduler.block_manager.num_free_blocks == 8 - len(going.block_table)


def test_abort_of_running_and_waiting_sequences():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq("running", 5), make_seq("waiting", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)

    assert scheduler.abort("running") is running
    assert running.finish_reason == "abort"
    assert running.status is SequenceStatus.FINISHED
    assert scheduler.running == []
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks

    assert scheduler.abort("waiting") is waiting
    assert waiting.finish_reason == "abort"
    assert not scheduler.has_unfinished()
    assert scheduler.abort("waiting") is None
    assert scheduler.abort("unknown") is None


def test_the_cache_grows_before_a_sequence_is_preempted_and_preempts_once_it_cannot():
    grants = iter([6, 6])  # the pool gives two more blocks once, then nothing more

    def grow(missing: int) -> int:
        return next(grants, manager.num_blocks)

    manager = BlockManager(4, BLOCK_SIZE, grow=grow)
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128)
    scheduler = Scheduler(limits, manager, eos_token_ids=[EOS])
    older, newer = make_seq("older", 4), make_seq("newer", 4)
    for seq in (older, newer):
        scheduler.add(seq)
    for _ in range(6):
        step(scheduler)
    # Third blocks for both (9 tokens): the cache grew from 4 to 6 instead of preempting.
    assert manager.num_blocks == 6 and scheduler.num_preemptions == 0
    assert len(older.block_table) == len(newer.block_table) == 3
    for _ in range(4):
        step(scheduler)
    # Fourth blocks: no growth left, so the newest sequence is preempted.
    assert scheduler.num_preemptions == 1 and newer.status is SequenceStatus.WAITING


# ---- asynchronous scheduling: a step scheduled while the one before is in flight ---------


def test_a_step_is_scheduled_while_the_one_before_is_in_flight():
    scheduler = make_scheduler()
    first, second = make_seq("first", 6), make_seq("second", 3)
    scheduler.add(first)
    scheduler.add(second)
    prefill = scheduler.schedule()
    prefill_placeholders = scheduler.commit(prefill)
    assert prefill_placeholders == [6, 3]
    assert first.token_ids[-1] == second.token_ids[-1] == PLACEHOLDER

    decode = scheduler.schedule()  # the prefill's tokens are still on their way
    assert decode == [first, second]
    assert [seq.num_scheduled_tokens for seq in decode] == [1, 1]
    decode_placeholders = scheduler.commit(decode)
    assert decode_placeholders == [7, 4]

    assert scheduler.resolve(prefill, prefill_placeholders, [11, 12]) == []
    assert scheduler.resolve(decode, decode_placeholders, [13, 14]) == []
    assert first.output_token_ids == [11, 13] and second.output_token_ids == [12, 14]
    assert first.num_computed_tokens == 7 and second.num_computed_tokens == 4


def test_a_sequence_whose_last_token_is_in_flight_is_not_scheduled_again():
    scheduler = make_scheduler()
    seq = make_seq("seq", 5, max_tokens=1)
    scheduler.add(seq)
    batch = scheduler.schedule()
    placeholders = scheduler.commit(batch)
    assert scheduler.schedule() == []
    assert scheduler.resolve(batch, placeholders, [FILLER]) == [seq]
    assert seq.finish_reason == "length" and seq.output_token_ids == [FILLER]
    assert scheduler.block_manager.num_used_blocks == 0


def test_a_token_in_flight_stops_a_sequence_and_the_next_steps_token_is_dropped():
    scheduler = make_scheduler()
    seq = make_seq("seq", 5)
    scheduler.add(seq)
    first = scheduler.schedule()
    first_placeholders = scheduler.commit(first)
    second = scheduler.schedule()
    second_placeholders = scheduler.commit(second)
    assert scheduler.resolve(first, first_placeholders, [EOS]) == [seq]
    assert seq.finish_reason == "stop" and seq.output_token_ids == [EOS]
    assert scheduler.resolve(second, second_placeholders, [FILLER]) == []
    assert seq.output_token_ids == [EOS]
    assert scheduler.block_manager.num_used_blocks == 0


def test_a_sequence_preempted_while_its_last_token_is_in_flight_finishes_from_the_queue():
    scheduler = make_scheduler(num_blocks=2)
    older, newer = make_seq("older", 4), make_seq("newer", 4, max_tokens=1)
    scheduler.add(older)
    scheduler.add(newer)
    batch = scheduler.schedule()
    placeholders = scheduler.commit(batch)
    # The older one's next token needs a block: the newer one gives up its own.
    assert scheduler.schedule() == [older]
    assert newer.status is SequenceStatus.WAITING and list(scheduler.waiting) == [newer]

    assert scheduler.resolve(batch, placeholders, [FILLER, FILLER]) == [newer]
    assert newer.finish_reason == "length" and newer.output_token_ids == [FILLER]
    assert not scheduler.waiting


def test_an_aborted_sequences_token_in_flight_is_dropped():
    scheduler = make_scheduler()
    seq = make_seq("seq", 5)
    scheduler.add(seq)
    batch = scheduler.schedule()
    placeholders = scheduler.commit(batch)
    scheduler.abort("seq")
    assert scheduler.resolve(batch, placeholders, [FILLER]) == []
    assert seq.finish_reason == "abort"
    assert scheduler.block_manager.num_used_blocks == 0

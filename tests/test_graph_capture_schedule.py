"""A worker's idle-gap work. Decode graphs are captured in its idle gaps: never while a resident
model has work, never by a load, one bucket per gap, smallest first; until its bucket is
captured a decode batch runs eagerly; an unloaded model's cache range is unmapped there too.
The capture is a CUDA operation, so here the schedule runs with a recording capture (GraphBuckets
is device-free) in a real Worker loop with real engines and real sockets; the capture itself is
scripts/gpu_check.py's to check."""

from __future__ import annotations

import os

import pytest
import torch
import zmq

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.engine.graph_buckets import OVERDUE_EAGER_STEPS, GraphBuckets
from warmserve.engine.mixed_graphs import MixedGraphs
from warmserve.protocol import (
    AddRequest,
    LoadModel,
    ModelLost,
    ModelWarm,
    WorkerArgs,
    command_encoder,
)
from warmserve.worker.worker import Worker


def test_buckets_replay_only_once_captured_smallest_first():
    captured = []
    buckets = GraphBuckets(20, captured.append)
    assert buckets.sizes == [1, 2, 4, 8, 16, 20]
    assert buckets.bucket(3) == 4 and buckets.bucket(21) is None
    assert buckets.replayable(1) is None  # nothing captured: eager
    assert [buckets.capture_next() for _ in range(3)] == [1, 2, 4] == captured
    assert [buckets.replayable(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]
    assert buckets.pending and buckets.next_size == 8


def test_a_failed_capture_leaves_larger_batches_eager():
    def capture(bucket):
        if bucket == 4:
            raise RuntimeError("out of memory")

    buckets = GraphBuckets(8, capture)
    buckets.capture_next(), buckets.capture_next()
    with pytest.raises(RuntimeError):
        buckets.capture_next()
    assert not buckets.pending
    assert buckets.replayable(2) == 2 and buckets.replayable(3) is None


def test_a_batch_size_run_eagerly_too_often_is_overdue_for_its_capture():
    captured = []
    buckets = GraphBuckets(20, captured.append)
    for _ in range(OVERDUE_EAGER_STEPS - 1):
        buckets.note_eager(3)
    assert buckets.overdue() is None
    buckets.note_eager(4)  # the same bucket
    assert buckets.overdue() == 4
    assert buckets.capture_bucket(4) == 4 and captured == [4]
    assert buckets.overdue() is None and buckets.replayable(3) == 4
    # The idle gaps go on from the smallest bucket still to capture.
    assert buckets.next_size == 1 and buckets.capture_next() == 1


@pytest.fixture
def worker():
    args = WorkerArgs(0, "cpu", "", "", 2**30, 0.9, 0.0, None, os.getppid(), peer_address="")
    context = zmq.Context()
    commands, inbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    commands.bind("inproc://commands")
    inbox.connect("inproc://commands")
    events, outbox = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    outbox.bind("inproc://events")
    events.connect("inproc://events")
    yield Worker(args, commands, events), inbox
    for socket in (commands, inbox, events, outbox):
        socket.close(linger=0)
    context.term()


def test_graphs_are_captured_in_idle_gaps_only(worker, checkpoint_factory):
    worker, inbox = worker
    path = str(checkpoint_factory("llama"))
    captures = []  # (model, bucket, the models with work at that moment)

    def load(name: str) -> None:
        command = LoadModel(
            1, name, name, path, None, "float32", 128, EngineConfig(max_num_seqs=4), 0, 1, None
        )
        worker.load(command)
        engine = worker.models.resident[name].engine
        assert engine.graph_buckets is None  # a CPU engine has no graphs: give it a schedule
        engine.runner.graph_buckets = GraphBuckets(
            4, lambda bucket: captures.append((name, bucket, worker.models.busy()))
        )

    def request(name: str, request_id: str, tokens: int) -> AddRequest:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        return AddRequest(name, request_id, [5, 6, 7, 8], params)

    load("a")
    assert captures == []  # the load captured nothing
    for index in range(3):
        worker.models.add_request(request("a", f"a{index}", 6))
    worker.turn()
    worker.turn()
    load("b")  # while a streams: b's graphs wait for a gap too
    assert captures == []
    turns = 0
    while worker.models.busy():
        worker.turn()
        turns += 1
    assert turns >= 4 and captures == []  # a stepped to its end with nothing captured
    worker.turn()
    assert captures == [("a", 1, [])]  # one bucket per gap
    inbox.send(command_encoder.encode(request("b", "b0", 5)))
    worker.turn()  # the request goes first...
    assert len(captures) == 1 and worker.models.busy() == ["b"]
    while worker.models.idle_work_pending():
        worker.turn()  # ...and no capture runs until b's stream is over
    assert all(busy == [] for _, _, busy in captures)
    assert [(name, bucket) for name, bucket, _ in captures] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 4),
        ("b", 4),
    ]
    for name in "ab":
        assert worker.models.resident[name].engine.graph_buckets.captured == [1, 2, 4]


def test_a_model_under_steady_traffic_captures_its_hot_bucket_between_steps(
    worker, checkpoint_factory
):
    """No idle gap comes while a model streams without pause: the bucket of its batch size is
    captured between two of its steps once that size has run eagerly often enough, and only
    that bucket."""
    worker, _ = worker
    path = str(checkpoint_factory("llama"))
    command = LoadModel(
        1, "a", "a", path, None, "float32", 128, EngineConfig(max_num_seqs=4), 0, 1, None
    )
    worker.load(command)
    captures = []  # (bucket, the models with work at that moment)
    engine = worker.models.resident["a"].engine
    engine.runner.graph_buckets = GraphBuckets(
        4, lambda bucket: captures.append((bucket, worker.models.busy()))
    )
    params = SamplingParams(max_tokens=OVERDUE_EAGER_STEPS + 8, temperature=0.0, ignore_eos=True)
    for index in range(3):
        worker.models.add_request(AddRequest("a", f"a{index}", [5, 6, 7, 8], params))
    steps = 0
    while worker.models.busy():
        worker.turn()
        steps += 1
        if steps < OVERDUE_EAGER_STEPS:
            assert captures == []
    assert captures == [(4, ["a"])]  # mid-traffic, once, the batch of 3's bucket
    assert engine.graph_buckets.captured == [4]


def test_idle_gaps_warm_the_step_kernels_first_then_report_the_model_warm(
    worker, checkpoint_factory
):
    """A model's first idle gap runs its step kernels once (on the scratch block), then its
    gaps capture graphs, decode graphs before those of steps with prompt tokens; when nothing
    is left the worker tells the server (ModelWarm), once."""
    worker, _ = worker
    sent = []
    worker.models.send = sent.append
    path = str(checkpoint_factory("llama"))
    worker.load(
        LoadModel(1, "a", "a", path, None, "float32", 128, EngineConfig(max_num_seqs=2), 0, 1, None)
    )
    engine = worker.models.resident["a"].engine
    assert [type(event) for event in sent] == [ModelWarm]  # a CPU model has no idle work
    worker.models.resident["a"].warm_reported = False  # now give it some, as a GPU would
    work = []
    engine.runner.graph_buckets = GraphBuckets(2, lambda bucket: work.append(bucket))
    engine.runner.mixed_graphs = MixedGraphs(None, torch.device("cpu"), 2, 64, 8, 16, 0, None)
    engine.runner.mixed_graphs.buckets.capture = lambda tokens: work.append(f"{tokens} tokens")
    engine.runner.step_kernels_warm = False
    warm = engine.runner.warm_step_kernels
    engine.runner.warm_step_kernels = lambda: (work.append("kernels"), warm())
    sent.clear()
    while worker.models.idle_work_pending():
        worker.turn()
    worker.turn()
    assert work == ["kernels", 1, 2, "32 tokens", "64 tokens"]
    assert [(type(e), e.deployment) for e in sent] == [(ModelWarm, "a")]
    assert sent[0].seconds > 0


def test_warming_the_step_kernels_leaves_the_streams_untouched(checkpoint_factory):
    """The warm-up steps write only the scratch block: a stream interrupted by them between
    every two steps gives the same greedy tokens, and the cache of its blocks is unchanged."""
    path = checkpoint_factory("llama")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def generate(warm_between_steps: bool) -> list[int]:
        engine = engine_from_checkpoint(path, dtype="float32", max_model_len=128)
        engine.add_request(
            "r", [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], params
        )
        tokens = []
        while engine.has_unfinished_requests():
            if warm_between_steps and engine.sequences:
                table = engine.sequences["r"].block_table
                k_cache = engine.runner.model.attention_layers()[0].k_cache
                before = k_cache[table].clone()
                engine.runner.warm_step_kernels()
                assert torch.equal(k_cache[table], before)
            tokens += [output.token_id for output in engine.step()]
        return tokens

    assert generate(True) == generate(False)


def test_a_model_whose_weights_are_still_copying_waits_while_another_has_work(
    worker, checkpoint_factory
):
    """The models share one compute stream, so a model whose load's copy still runs is not
    stepped while another model has work (its wait for the copy would hold that model's steps
    back); alone, it is stepped at once (its kernels queue behind the copy)."""
    worker, _ = worker
    path = str(checkpoint_factory("llama"))
    for index, name in enumerate("ab"):
        worker.load(
            LoadModel(index, name, name, path, None, "float32", 128, EngineConfig(), 0, 1, None)
        )

    class CopyRunning:
        def query(self) -> bool:
            return False

    stepped = []
    for name in "ab":
        engine = worker.models.resident[name].engine
        engine.step = lambda name=name: stepped.append(name) or []
    worker.models.resident["b"].engine.weights_ready = CopyRunning()
    for _ in range(3):
        worker.models.step_next(["a", "b"])
    worker.models.step_next(["b"])
    assert stepped == ["a", "a", "a", "b"]


def test_a_model_whose_weight_copy_failed_is_reported_lost_in_an_idle_gap(
    worker, checkpoint_factory
):
    """A copy run in a thread (host memory not registered yet) that fails leaves the model
    without weights: the next idle gap drops it and tells the server (ModelLost), instead of
    trying its idle work again and again."""
    worker, _ = worker
    sent = []
    worker.models.send = sent.append
    path = str(checkpoint_factory("llama"))
    worker.load(LoadModel(1, "a", "a", path, None, "float32", 128, EngineConfig(), 0, 1, None))

    class CopyFailed:
        error = OSError("reading the checkpoint failed")

        def query(self) -> bool:
            return True

    worker.models.resident["a"].engine.weights_ready = CopyFailed()
    sent.clear()
    worker.models.work_in_idle_gap()
    assert "a" not in worker.models.resident
    assert [(type(e), e.deployment) for e in sent] == [(ModelLost, "a")]
    assert "reading the checkpoint failed" in sent[0].error


def test_an_unloaded_models_cache_range_is_unmapped_in_the_next_idle_gap(
    worker, checkpoint_factory
):
    """An unload hands the cache's pages back to the pool at once; the range is unmapped when
    the worker next has nothing to do (engine/kv_pool.py: unmapping is an eviction's slow part)."""
    worker, _ = worker
    worker.kv.start()
    path = str(checkpoint_factory("llama"))
    worker.load(
        LoadModel(1, "a", "a", path, None, "float32", 128, EngineConfig(max_num_seqs=2), 0, 1, None)
    )
    worker.unload(None, "a")
    assert worker.kv.retiring and worker.kv.pool.mapped_pages == 0
    worker.turn()
    assert not worker.kv.retiring

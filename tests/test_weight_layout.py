"""The host store's segment layout (forward order, stacked projections side by side) and the
binding of a model's stacked parameters as single views of one copy of it; a tensor-parallel
rank's shard stored as one span and bound back from a copy of that span alone."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.arena import shard_layout, store_shard
from warmserve.engine.engine_build import build_engine, engine_from_checkpoint
from warmserve.layers.parallel import TensorParallelGroup, building
from warmserve.loader.checkpoint import Checkpoint
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.loader.weight_store import HostWeightStore, forward_order
from warmserve.models.config import ModelConfig
from warmserve.models.registry import model_class
from warmserve.models.weights import WeightLoadError, bind_parameters, bind_whole_parameters


def test_forward_order_puts_layers_in_numeric_order_and_the_head_last():
    names = [
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.10.self_attn.q_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.2.self_attn.v_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.mlp.gate_proj.weight",
        "model.layers.2.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
    ]
    ordered = sorted(names, key=forward_order)
    assert ordered[0] == "model.embed_tokens.weight"
    assert ordered[-2:] == ["model.norm.weight", "lm_head.weight"]
    layer_2 = [name for name in ordered if ".layers.2." in name]
    assert ordered.index(layer_2[-1]) < ordered.index("model.layers.10.self_attn.q_proj.weight")
    projections = [name.split(".")[-2] for name in layer_2]
    assert projections == ["gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"]


@pytest.fixture
def store():
    store = HostWeightStore(2**30, f"test{os.getpid()}")
    yield store
    store.close()


@pytest.mark.parametrize("family", ["qwen3", "llama", "opt"])
def test_segment_holds_every_tensor_with_stacked_projections_side_by_side(
    checkpoint_factory, store, family
):
    path = checkpoint_factory(family, sharded=family == "llama")
    segment = store.store_checkpoint(family, Checkpoint(path))
    weights = SegmentWeights(segment)
    try:
        stored = dict(weights.tensors())
        expected = {}
        for file in path.glob("*.safetensors"):
            expected.update(load_file(file))
        assert stored.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(stored[name], tensor), name
        entries = {entry.name: entry for entry in segment.tensors}
        stacks = 0
        for name, entry in entries.items():
            for first, second in (
                ("q_proj", "k_proj"),
                ("k_proj", "v_proj"),
                ("gate_proj", "up_proj"),
            ):
                if f".{first}." in name:
                    neighbour = entries.get(name.replace(f".{first}.", f".{second}."))
                    if neighbour is not None:
                        assert neighbour.offset == entry.offset + entry.nbytes, name
                        stacks += 1
        assert stacks > 0
        assert all(entry.offset % 2 == 0 for entry in entries.values())
    finally:
        weights.close()


def _meta_model(path):
    config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        return model_class(config)(ModelConfig.from_dict(config))


def _rank_model(path, rank: int, size: int, device: str = "cpu"):
    """Rank `rank` of `size`'s shard of the model (built only: no group to run it in)."""
    config = json.loads((path / "config.json").read_text())
    with building(TensorParallelGroup(rank, size)), torch.device(device):
        return model_class(config)(ModelConfig.from_dict(config))


def test_each_rank_shard_is_one_span_that_binds_back_by_parameter(checkpoint_factory, store):
    path = checkpoint_factory("qwen3")
    tensors = load_file(path / "model.safetensors")
    ranks = []
    for rank in range(2):
        model = _rank_model(path, rank, 2)
        model.load_weights(tensors.items())
        ranks.append(model)
    segment = store.begin_shards("shards", [shard_layout(model) for model in ranks])
    writer = SegmentWeights(segment)
    for rank, model in enumerate(ranks):
        store_shard(model, writer.rank_view(rank))
    writer.close()
    store.finish_shards("shards", written=True)
    assert [shard.offset for shard in segment.ranks] == [0, segment.ranks[1].offset]
    assert segment.ranks[0].size <= segment.ranks[1].offset and segment.ranks[1].offset % 4096 == 0

    reader = SegmentWeights(segment)
    try:
        span = reader.rank_view(1)
        arena = torch.empty(span.size, dtype=torch.uint8)
        span.copy_into(arena)  # rank 1's bytes alone
        bound = _rank_model(path, 1, 2, device="meta")
        bind_whole_parameters(bound, span.views_into(arena))
        expected = dict(ranks[1].named_parameters())
        for name, param in bound.named_parameters():
            assert torch.equal(param, expected[name]), name
            assert param.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        views = span.views_into(arena)
        del views["model.norm.weight"]
        with pytest.raises(WeightLoadError, match=r"model\.norm\.weight"):
            bind_whole_parameters(_rank_model(path, 1, 2, device="meta"), views)
    finally:
        reader.close()


def test_stacked_parameters_are_single_views_of_the_arena(checkpoint_factory, store):
    path = checkpoint_factory("qwen3")
    weights = SegmentWeights(store.store_checkpoint("qwen3", Checkpoint(path)))
    try:
        arena = weights.buffer.clone()
        views = weights.views_into(arena)
        model = _meta_model(path)
        bind_parameters(model, views)
        attention = model.model.layers[0].self_attn
        q = views["model.layers.0.self_attn.q_proj.weight"]
        v = views["model.layers.0.self_attn.v_proj.weight"]
        stacked = attention.qkv_proj.weight
        assert stacked.data_ptr() == q.data_ptr()
        assert stacked.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert torch.equal(stacked[-v.shape[0] :], v)
        gate_up = model.model.layers[0].mlp.gate_up_proj.weight
        gate = views["model.layers.0.mlp.gate_proj.weight"]
        assert gate_up.data_ptr() == gate.data_ptr()
    finally:
        weights.close()


def test_projections_apart_in_memory_are_refused_by_name(checkpoint_factory, store):
    path = checkpoint_factory("qwen3")
    weights = SegmentWeights(store.store_checkpoint("qwen3", Checkpoint(path)))
    try:
        views = weights.views_into(weights.buffer.clone())
        name = "model.layers.1.self_attn.k_proj.weight"
        views[name] = views[name].clone()  # same values, somewhere else
        with pytest.raises(WeightLoadError, match=name):
            bind_parameters(_meta_model(path), views)
    finally:
        weights.close()


def test_reloads_from_the_store_generate_what_checkpoint_loads_do(checkpoint_factory, store):
    """A, then B (same shape, other weights: the recorded binding is replayed), then A again."""
    paths = [checkpoint_factory("qwen3", seed=seed) for seed in (0, 1)]
    config = EngineConfig(max_num_seqs=4)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def generate(engine):
        engine.add_request("r", [3, 17, 42, 99, 5], greedy)
        tokens = []
        while engine.has_unfinished_requests():
            tokens += [output.token_id for output in engine.step()]
        engine.close()
        return tokens

    expected = [
        generate(engine_from_checkpoint(path, dtype="float32", engine_config=config))
        for path in paths
    ]
    assert expected[0] != expected[1]
    segments = [
        SegmentWeights(store.store_checkpoint(str(path), Checkpoint(path))) for path in paths
    ]
    try:
        for index in (0, 1, 0):
            engine = build_engine(
                json.loads((paths[index] / "config.json").read_text()),
                segments[index],
                dtype="float32",
                engine_config=config,
            )
            assert engine.skeleton is not None  # bound to one arena, not copied tensor by tensor
            assert engine.skeleton.layout == segments[index].layout
            assert generate(engine) == expected[index]
    finally:
        for segment in segments:
            segment.close()

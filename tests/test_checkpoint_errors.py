"""A bad checkpoint fails its load with a CheckpointError that names the file and the problem,
and leaves nothing of the half-loaded model in memory."""

from __future__ import annotations

import json
import shutil
import struct
import weakref

import pytest
from safetensors.torch import load_file, save_file

from warmserve.engine import engine_build as engine_module
from warmserve.engine.engine_build import engine_from_checkpoint
from warmserve.loader.checkpoint import CheckpointError

# The last tensor that the loader reaches: a failure there comes after the whole model was built
# and nearly all of it loaded.
LAST_LAYER_TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def llama_copy(llama_path, tmp_path):
    return shutil.copytree(llama_path, tmp_path / "llama")


@pytest.fixture
def sharded_copy(checkpoint_factory, tmp_path):
    return shutil.copytree(checkpoint_factory("llama", sharded=True), tmp_path / "sharded")


def load(path):
    return engine_from_checkpoint(path, max_model_len=64, dtype="float32")


def rewrite_tensors(file, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def remove_config(path):
    (path / "config.json").unlink()
    return path / "config.json", "file not found"


def unknown_architecture(path):
    edit_config(path, lambda config: config.update(architectures=["GPT17ForCausalLM"]))
    return path / "config.json", "'GPT17ForCausalLM' is not supported"


def config_not_json(path):
    (path / "config.json").write_text("{not json")
    return path / "config.json", "not valid JSON"


def config_without_hidden_size(path):
    edit_config(path, lambda config: config.pop("hidden_size"))
    return path / "config.json", "hidden_size"


def missing_tensor(path):
    rewrite_tensors(path / "model.safetensors", lambda tensors: tensors.pop(LAST_LAYER_TENSOR))
    return path, f"missing tensors {LAST_LAYER_TENSOR}"


def misshaped_tensor(path):
    def change(tensors):
        tensors[LAST_LAYER_TENSOR] = tensors[LAST_LAYER_TENSOR][:, :-1].contiguous()

    rewrite_tensors(path / "model.safetensors", change)
    return path / "model.safetensors", f"{LAST_LAYER_TENSOR}: shape (128, 63) in the checkpoint"


def unexpected_tensor(path):
    def change(tensors):
        tensors["model.layers.7.mlp.up_proj.weight"] = tensors[LAST_LAYER_TENSOR].clone()

    rewrite_tensors(path / "model.safetensors", change)
    return path / "model.safetensors", "model.layers.7.mlp.up_proj.weight: tensor not used"


def truncated_file(path):
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    return file, "truncated safetensors file"


def truncated_to_nothing(path):
    file = path / "model.safetensors"
    file.write_bytes(b"\x10\x00")
    return file, "truncated safetensors file (no header)"


def corrupt_header(path):
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"#garbage"
    file.write_bytes(bytes(data))
    return file, "corrupt safetensors header"


def header_longer_than_file(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    return file, "truncated or corrupt safetensors header"


def header_sizes_disagree(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    # Same length, so that the header stays in place: float16 needs half the bytes stored.
    declared = b'"model.norm.weight":{"dtype":"F32"'
    assert data.count(declared) == 1
    file.write_bytes(data.replace(declared, declared.replace(b"F32", b"F16")))
    return file, "'model.norm.weight' has 256 bytes, its shape (64,) needs 128"


def no_weights(path):
    (path / "model.safetensors").unlink()
    return path, "no model.safetensors or model.safetensors.index.json"


BROKEN_SINGLE_FILE = [
    remove_config,
    unknown_architecture,
    config_not_json,
    config_without_hidden_size,
    missing_tensor,
    misshaped_tensor,
    unexpected_tensor,
    truncated_file,
    truncated_to_nothing,
    corrupt_header,
    header_longer_than_file,
    header_sizes_disagree,
    no_weights,
]


@pytest.mark.parametrize("breakage", BROKEN_SINGLE_FILE, ids=lambda breakage: breakage.__name__)
def test_broken_checkpoint_names_file_and_problem(llama_copy, breakage):
    file, problem = breakage(llama_copy)
    with pytest.raises(CheckpointError) as error:
        load(llama_copy)
    message = str(error.value)
    assert message.startswith(str(file.resolve())), message
    assert problem in message


def missing_shard(path):
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return shard, "shard named in model.safetensors.index.json not found"


def index_without_weight_map(path):
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    return index, "no weight_map"


def truncated_shard(path):
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    return shard, "truncated safetensors file"


@pytest.mark.parametrize(
    "breakage",
    [missing_shard, index_without_weight_map, truncated_shard],
    ids=lambda breakage: breakage.__name__,
)
def test_broken_sharded_checkpoint_names_file_and_problem(sharded_copy, breakage):
    file, problem = breakage(sharded_copy)
    with pytest.raises(CheckpointError) as error:
        load(sharded_copy)
    message = str(error.value)
    assert message.startswith(str(file.resolve())), message
    assert problem in message


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "breakage", [missing_tensor, misshaped_tensor, unexpected_tensor], ids=lambda b: b.__name__
)
def test_a_failed_load_leaves_no_model_behind(llama_copy, monkeypatch, breakage):
    """The model and its weights are gone as soon as the load fails, even while the caller still
    holds the error (a worker reports it, then frees device memory)."""
    breakage(llama_copy)
    models = []
    real_model_class = engine_module.model_class

    def tracking_model_class(config):
        architecture = real_model_class(config)

        def build(config):
            model = architecture(config)
            models.append(weakref.ref(model))
            models.append(weakref.ref(next(model.parameters())))
            return model

        return build

    monkeypatch.setattr(engine_module, "model_class", tracking_model_class)
    with pytest.raises(CheckpointError) as error:
        load(llama_copy)

    assert len(models) == 2
    assert [ref() for ref in models] == [None, None], error.value

"""A GGUF file warmserve cannot serve is refused with a message naming the file and the
problem, before anything is loaded."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter

from warmserve.loader.checkpoint import Checkpoint, CheckpointError, read_model_config
from warmserve.loader.tensors import iter_checkpoint_tensors

HEADS, HIDDEN = 2, 8


def write_gguf(path, architecture="llama", tensors=None, metadata=True):
    writer = GGUFWriter(str(path), architecture)
    if metadata:
        writer.add_block_count(1)
        writer.add_context_length(32)
        writer.add_embedding_length(HIDDEN)
        writer.add_feed_forward_length(16)
        writer.add_head_count(HEADS)
        writer.add_vocab_size(4)
    for name, array in (tensors or {"token_embd.weight": np.ones((4, HIDDEN), np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_a_small_llama_gguf_reads_with_hf_names_and_unpermuted_projections(tmp_path):
    query = np.arange(HIDDEN * HIDDEN, dtype=np.float32).reshape(HIDDEN, HIDDEN)
    path = write_gguf(
        tmp_path / "tiny.gguf",
        tensors={
            "token_embd.weight": np.ones((4, HIDDEN), np.float32),
            "blk.0.attn_q.weight": query,
        },
    )
    _, config = read_model_config(path)
    assert (config["hidden_size"], config["num_key_value_heads"], config["head_dim"]) == (8, 2, 4)
    assert config["tie_word_embeddings"] is True
    tensors = dict(iter_checkpoint_tensors(Checkpoint(path)))
    assert set(tensors) == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    # llama.cpp interleaves each head's rotary halves: rows (0, 2, 1, 3) of every head go back.
    rows = tensors["model.layers.0.self_attn.q_proj.weight"][:, 0].tolist()
    assert rows == [0.0, 16.0, 8.0, 24.0, 32.0, 48.0, 40.0, 56.0]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda path: path.write_bytes(b"not a gguf at all"), "not a GGUF file"),
        (lambda path: path.write_bytes(b"GGUF\x03\x00\x00\x00\x05"), "truncated GGUF header"),
        (
            lambda path: write_gguf(path, architecture="mamba"),
            "architecture 'mamba' is not supported",
        ),
        (
            lambda path: write_gguf(path, metadata=False),
            "GGUF metadata has no llama.attention.head_count",
        ),
        (
            lambda path: write_gguf(path, tensors={"blk.0.mystery.weight": np.ones(4, np.float32)}),
            "tensor 'blk.0.mystery.weight' has no counterpart in LlamaForCausalLM",
        ),
    ],
)
def test_an_unusable_gguf_names_the_file_and_the_problem(tmp_path, make, problem):
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(CheckpointError) as raised:
        Checkpoint(path)
    assert str(raised.value).startswith(str(path)) and problem in str(raised.value)


def test_a_missing_gguf_file(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        read_model_config(tmp_path / "absent.gguf")

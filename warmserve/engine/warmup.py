"""The warm-up a worker runs before it reports ready: a tiny built-in model through prefill,
decode and sampling, so kernels, allocators and library handles exist before the first load."""

from __future__ import annotations

import torch

from warmserve.config import EngineConfig, SamplingParams
from warmserve.engine.engine_build import build_engine

WARMUP_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
}


def warm_up(device: torch.device, dtype: str) -> None:
    engine = build_engine(
        WARMUP_CONFIG,
        None,
        device=device,
        dtype=dtype,
        engine_config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=128),
    )
    engine.add_request(
        "warmup-greedy", list(range(1, 20)), SamplingParams(max_tokens=4, temperature=0)
    )
    engine.add_request(
        "warmup-sampled",
        list(range(5, 9)),
        SamplingParams(max_tokens=4, seed=0, top_p=0.9, top_k=8),
    )
    while engine.has_unfinished_requests():
        engine.step()
    while engine.has_idle_work():  # on a GPU: the capture path, as a worker's idle gap runs it
        engine.do_idle_work()
    engine.close()

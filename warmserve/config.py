"""Frozen configuration shared by every layer: the server, a model to deploy, a request's sampling."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# OpenAI's bound on top_logprobs; vLLM's default max_logprobs is the same.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow, compiled and enforced in the worker.

    `kind` is json_schema (spec: the schema as JSON text), json_object (spec unused), regex
    (spec: the pattern) or choice (spec: a JSON list of the allowed strings). `field` is the
    request field it came from, which an error names."""

    kind: str
    spec: str = ""
    field: str = "structured output"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ConfigError(
                f"structured output kind must be one of {sorted(STRUCTURED_OUTPUT_KINDS)}, "
                f"got {self.kind!r}"
            )


STRUCTURED_OUTPUT_KINDS = {"json_schema", "json_object", "regex", "choice"}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logits processors, applied in vLLM's order before temperature: logit_bias, min_tokens,
    # then the repetition, frequency and presence penalties (see layers/logits_processors.py).
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI's semantics, over output tokens
    presence_penalty: float = 0.0
    min_p: float = 0.0  # after top-k and top-p, as transformers' MinPLogitsWarper
    # Log-probabilities of each sampled token (log-softmax of the raw logits) and of this many
    # most likely alternatives; None: none computed.
    logprobs: int | None = None
    # The same for each prompt token after the first (none for the first: nothing precedes it).
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.top_p == 0.0:
            raise ConfigError("top_p must be greater than 0")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ConfigError(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name, low, high in (
            ("frequency_penalty", -2.0, 2.0),
            ("presence_penalty", -2.0, 2.0),
            ("min_p", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        penalty = self.repetition_penalty
        if not isinstance(penalty, (int, float)) or not 0.0 < penalty < math.inf:
            raise ConfigError(f"repetition_penalty must be a number > 0, got {penalty!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}"
            )
        for token_id, bias in self.logit_bias:
            if not isinstance(token_id, int) or token_id < 0:
                raise ConfigError(f"logit_bias: token ids must be non-negative, got {token_id!r}")
            if not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise ConfigError(f"logit_bias: biases must lie in [-100, 100], got {bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ConfigError(
                    f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether any penalty needs the sequence's earlier tokens."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass(frozen=True)
class ModelSpec:
    """A model to deploy: what a client names and where its checkpoint lies."""

    name: str
    path: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    keep_alive: float = 300.0  # seconds; 0 = unload after each request, -1 = never
    pinned: bool = False
    preload: bool = False
    port: int | None = None

    def __post_init__(self) -> None:
        # The one place a model's deployment fields are checked: the registry, the admin API,
        # the CLI and the Python API all build a ModelSpec.
        if not isinstance(self.name, str) or not self.name or len(self.name) > 128:
            raise ConfigError("name must be 1 to 128 characters")
        if "/" in self.name:
            raise ConfigError("name must not contain '/'")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("path must be a non-empty string")
        if _not_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be a positive integer")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and (
            _not_int(self.max_model_len) or not 2 <= self.max_model_len <= MAX_MODEL_LEN
        ):
            raise ConfigError(f"max_model_len must be an integer from 2 to {MAX_MODEL_LEN}")


GIB = 2**30

# No model's context is longer; the bound also keeps the figure within a 32-bit message field.
MAX_MODEL_LEN = 2**31 - 1


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# The serving dtypes and their sizes in bytes; "auto" serves a checkpoint in its own dtype.
DTYPE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = {"auto", *DTYPE_ITEMSIZE}


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one deployment's engine (scheduler and KV cache)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    # The prompt tokens a step may carry while it also decodes running streams: a prompt chunk
    # lengthens that step's inter-token gap for every stream (about 2.3 ms per 100 tokens at an
    # 8B shape on an H200), so chunks beside decodes are kept small; a step with no decode takes
    # up to max_num_batched_tokens. Once the model has run steps, more while such a step stays
    # within prompt_step_time_ratio decode steps' time (engine/prompt_budget.py; 0: never
    # more): a small model's prompt chunks cost its streams little, and fewer, larger ones
    # admit prompts in fewer steps. The floor is below vLLM's 512 because at 512 an 8B-shaped
    # model's mixed step already took 2.7 decode steps on an H200 (ITL p99 3.2x its median).
    prefill_tokens_beside_decodes: int = 256
    prompt_step_time_ratio: float = 2.5
    # Launch each step before the tokens of the one before are on the host, so that the host's
    # scheduling and input building overlap the device's work (vLLM's --async-scheduling).
    # Requests with penalties, log-probabilities or a grammar still wait for the step before.
    # None: on a GPU (as vLLM's default), off on a CPU, where launching a step computes it and
    # nothing would overlap.
    async_scheduling: bool | None = None
    # Kernels whose result for a token does not depend on what else a step runs, so that a
    # greedy request's tokens do not depend on the load (layers/batch_invariance.py); slower,
    # GPU only, as vLLM's batch-invariant mode.
    batch_invariant: bool = False
    block_size: int = 16
    # A fixed KV cache size; None (the default): the cache is elastic, drawn from the worker's
    # KV pool as the model needs blocks, up to what the other models leave free.
    kv_cache_bytes: int | None = None
    # The KV cache a model always keeps (and placement counts in its footprint): this many
    # tokens, or its whole context if shorter; a request this long always runs. 4,096 tokens of
    # an 8B model is 512 MiB, so eight such models fit on one H200 beside their weights (at
    # --gpu-memory-utilization 0.92).
    min_kv_tokens: int = 4096


CPU_WORKER_MEMORY_GB = 4.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cuda | cpu
    workers: int | None = None  # None: one per GPU, or 2 on CPU
    model_root: str | None = None
    models_file: str | None = None  # the registry (--models models.yaml)
    host_cache_gb: float = 16.0
    api_key: str | None = None
    # The most memory models may take on each worker (weights, KV cache, activations); on a CPU
    # worker, the memory it stands in for (CPU_WORKER_MEMORY_GB when None).
    worker_memory_gb: float | None = None
    # The share of each GPU's memory warmserve may use, the CUDA context included.
    gpu_memory_utilization: float = 0.9
    # A model's context unless its load names one (None: the checkpoint's own).
    max_model_len: int | None = None
    request_timeout_s: float = 600.0
    # An idle keep-alive HTTP connection is closed after this long (uvicorn's default, as in
    # vLLM's server); a client that keeps idle connections longer may send a request on one
    # just as it closes.
    http_keep_alive_s: float = 5.0
    load_timeout_s: float = 600.0
    # How long an unload lets requests in flight finish before it ends them with an error.
    unload_grace_s: float = 10.0
    # A GPU worker hands an unloaded model's memory to the driver this long after the unload,
    # unless a load comes first: a swap's next model then takes the same memory (no cudaFree,
    # no cudaMalloc, and its copy lands in memory the GPU has already mapped).
    memory_release_delay_s: float = 0.25
    # Requests one model may hold waiting (for its load, or beyond the batch its engine runs);
    # more are refused at once with 503 and Retry-After.
    max_queued_requests: int = 256
    # How long a request waits for its model to be loaded (room made, the load done) before it
    # is refused with 503.
    queue_timeout_s: float = 60.0
    # A model loaded on demand stays at least this long before it may be evicted for another,
    # so that requests alternating between models that do not fit together are served in
    # groups instead of swapping on every request.
    min_residency_s: float = 1.0
    # A Ray cluster to run the workers on ("auto": the one this host belongs to); None: the
    # workers are child processes of the server.
    ray_address: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)


def user_cache_dir() -> Path:
    """Where warmserve keeps what it downloads or derives for a user (the demo's model,
    dequantized GGUF copies): $WARMSERVE_CACHE_DIR, or warmserve/ under $XDG_CACHE_HOME
    (~/.cache by default)."""
    explicit = os.environ.get("WARMSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "warmserve"

"""An in-memory stand-in for the Controller, for fast tests of the HTTP layer alone.

It produces one token per "word" ("w0 w1 ..."), and can be told to fail a model's streams
mid-way, which the real controller does only when a worker dies or the model is unloaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from warmserve.config import ModelSpec, SamplingParams
from warmserve.controller.admission import QueueStats
from warmserve.controller.errors import (
    InvalidRequest,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NoCapacity,
    PathForbidden,
)
from warmserve.controller.events import ENGINE_STEP_BUCKETS
from warmserve.controller.histograms import Histograms
from warmserve.controller.types import (
    GenerationChunk,
    LoadResult,
    ModelInfo,
    ResidentModel,
    WorkerInfo,
)

VOCAB_SIZE = 100
MODEL = "m"  # the model the `client` fixture (conftest.py) loads
# Each fake worker has room for one fake model.
MODEL_BYTES = WORKER_USABLE_BYTES = 1 << 30
# A resident model's KV cache and its worker's KV pool, as a worker would report them.
KV_MAPPED_BYTES, KV_USED_BYTES, KV_POOL_FREE_BYTES = 64 << 20, 16 << 20, 256 << 20


class FakeTokenizer:
    """Renders "role: content" lines (tools first); the rendered chat is kept on the controller
    for tests."""

    def __init__(self, controller: FakeController):
        self.controller = controller
        self.generation_defaults = controller.generation_defaults

    def chat_token_ids(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **options,
    ) -> list[int]:
        lines = [f"{message['role']}: {message['content']}" for message in messages]
        if tools:
            lines.insert(0, "tools: " + ", ".join(tool["function"]["name"] for tool in tools))
        text = "\n".join([*lines, "assistant:"] if add_generation_prompt else lines)
        self.controller.last_chat = (text, options)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return [len(word) % VOCAB_SIZE for word in text.split()]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{token}" for token in token_ids)


class FakeController:
    def __init__(self, workers: int = 2):
        self._workers = [
            WorkerInfo(
                i,
                1000 + i,
                "cpu",
                "local",
                "ready",
                [],
                4 << 30,
                0,
                0,
                WORKER_USABLE_BYTES,
                1 << 30,
                kv_pool_free_bytes=KV_POOL_FREE_BYTES,
            )
            for i in range(workers)
        ]
        self.queue_stats = QueueStats()
        self.step_stats = Histograms(ENGINE_STEP_BUCKETS)
        self._models: dict[str, ModelInfo] = {}
        self._listeners = []
        self.loads_seen = 0
        self.failing_models: set[str] = set()
        self.token_delay_s = 0.0
        self.aborted: list[str] = []
        self.last_prompt: str | list[int] | None = None
        self.last_chat: tuple[str, dict] | None = None
        self.generation_defaults: dict = {}
        self.last_params: SamplingParams | None = None
        self.last_keep_alive: float | None = None
        self.requests: list[tuple[str | list[int], SamplingParams]] = []
        # When set, a generation streams these pieces of text and stops (a scripted reply).
        self.reply_pieces: list[str] | None = None
        self.registry: dict[str, ModelSpec] = {}
        self.counters = {"auto_loads": 0, "evictions": 0, "idle_unloads": 0}
        self.host_cache_bytes = 0
        self.host_cache_capacity_bytes = 1 << 30

    def add_listener(self, callback) -> None:
        self._listeners.append(callback)

    def _emit(self, event: str, name: str) -> None:
        for callback in self._listeners:
            callback(event, name)

    async def load(
        self, name, path, tensor_parallel_size=1, dtype="auto", max_model_len=None, keep_alive=-1.0
    ):
        if path.startswith("/"):
            raise PathForbidden(f"{path} is outside the model root")
        if name in self._models:
            raise ModelExists(f"model {name!r} is already loaded")
        free = [worker for worker in self._workers if worker.memory_free_bytes >= MODEL_BYTES]
        if len(free) < tensor_parallel_size:
            raise NoCapacity("no room: explicitly loaded models hold the memory")
        chosen = free[:tensor_parallel_size]
        for worker in chosen:
            worker.models.append(
                ResidentModel(name, MODEL_BYTES, "loaded", KV_MAPPED_BYTES, KV_USED_BYTES)
            )
            worker.memory_used_bytes += MODEL_BYTES
            worker.memory_free_bytes -= MODEL_BYTES
        self.loads_seen += 1
        source = "host-cache" if self.loads_seen > 1 else "disk"
        self._models[name] = ModelInfo(
            name,
            path,
            "loaded",
            [worker.id for worker in chosen],
            tensor_parallel_size,
            dtype,
            max_model_len or 512,
            source,
            0.01,
            keep_alive=keep_alive,
        )
        self._emit("loaded", name)
        return LoadResult(name, [worker.id for worker in chosen], 0.01, source)

    async def unload(self, name: str) -> float:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        self._emit("unloading", name)
        del self._models[name]
        for worker in self._workers:
            if any(model.name == name for model in worker.models):
                worker.models = [model for model in worker.models if model.name != name]
                worker.memory_used_bytes -= MODEL_BYTES
                worker.memory_free_bytes += MODEL_BYTES
        self._emit("unloaded", name)
        return 0.002

    async def register(self, spec: ModelSpec) -> None:
        if spec.path.startswith("/"):
            raise PathForbidden(f"{spec.path} is outside the model root")
        if spec.name in self.registry or spec.name in self._models:
            raise ModelExists(f"model {spec.name!r} is already registered or loaded")
        self.registry[spec.name] = spec

    async def unregister(self, name: str) -> None:
        if self.registry.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} is not registered")

    def model(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise ModelNotFound(f"model {name!r} is not loaded")

    def models(self) -> list[ModelInfo]:
        registered = [
            ModelInfo(spec.name, spec.path, "disk", keep_alive=spec.keep_alive, pinned=spec.pinned)
            for spec in self.registry.values()
            if spec.name not in self._models
        ]
        return [*self._models.values(), *registered]

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers)

    def tokenizer(self, name: str) -> FakeTokenizer:
        self.model(name)
        return FakeTokenizer(self)

    async def generate(
        self,
        name: str,
        prompt: str | list[int],
        params: SamplingParams,
        keep_alive: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        info = self.model(name)
        if isinstance(prompt, list) and any(token >= VOCAB_SIZE for token in prompt):
            raise InvalidRequest(f"token ids must be below {VOCAB_SIZE}")
        self.last_prompt, self.last_params = prompt, params
        self.requests.append((prompt, params))
        self.last_keep_alive = keep_alive
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        info.requests_in_flight += 1
        try:
            for index, piece in enumerate(self.reply_pieces or ()):
                last = index == len(self.reply_pieces) - 1
                yield GenerationChunk(
                    piece, [index], "stop" if last else None, prompt_tokens, index + 1
                )
            for index in range(0 if self.reply_pieces else params.max_tokens):
                if index and name in self.failing_models:
                    raise ModelUnavailable(f"model {name!r} was unloaded")
                await asyncio.sleep(self.token_delay_s)
                last = index == params.max_tokens - 1
                yield GenerationChunk(
                    f" w{index}", [index], "length" if last else None, prompt_tokens, index + 1
                )
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(name)
            raise
        finally:
            info.requests_in_flight -= 1

"""The models resident in one worker: building and dropping their engines, routing requests to
them by deployment id, and stepping them in turn."""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from warmserve.engine.engine import Engine, InsufficientMemory, RequestRejected, eos_token_ids
from warmserve.loader.checkpoint import CheckpointError, read_model_config
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.models.weights import WeightLoadError
from warmserve.protocol import (
    AbortRequest,
    AddRequest,
    ErrorKind,
    LoadModel,
    ModelLost,
    RequestFailed,
    StepOutputs,
)
from warmserve.worker.fair_share import FairShare

# Followers wait in a collective for the lead's next step for as long as the model stays loaded.
GROUP_TIMEOUT = timedelta(days=30)


class LoadRefused(Exception):
    def __init__(self, message: str, kind: ErrorKind):
        super().__init__(message)
        self.kind = kind


@dataclass
class Resident:
    deployment: str
    engine: Engine
    tp_rank: int
    tp_size: int


class ResidentModels:
    def __init__(self, worker_id: int, device: torch.device, send: Callable[[object], None]):
        self.worker_id = worker_id
        self.device = device
        self.send = send
        self.resident: dict[str, Resident] = {}
        self.fair_share = FairShare()

    def footprint_bytes(self) -> int:
        return sum(model.engine.footprint_bytes for model in self.resident.values())

    def busy(self) -> list[str]:
        return [
            key
            for key, model in self.resident.items()
            if model.tp_rank == 0 and model.engine.has_unfinished_requests()
        ]

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, command: AddRequest) -> None:
        model = self.resident.get(command.deployment)
        if model is None:
            self._request_failed(command.deployment, command.request_id, "the model is not loaded")
            return
        try:
            model.engine.add_request(command.request_id, command.prompt_token_ids, command.sampling)
        except (RequestRejected, ValueError) as exc:  # the request's own fault: a 400
            self.send(
                RequestFailed(
                    self.worker_id, command.deployment, command.request_id, str(exc), True
                )
            )

    def abort_request(self, command: AbortRequest) -> None:
        model = self.resident.get(command.deployment)
        if model is not None:
            model.engine.abort_request(command.request_id)

    def _request_failed(self, deployment: str, request_id: str, reason: str) -> None:
        self.send(RequestFailed(self.worker_id, deployment, request_id, reason))

    def step_next(self, busy: list[str]) -> None:
        key = self.fair_share.pick(busy)
        model = self.resident[key]
        started = time.perf_counter()
        try:
            outputs = model.engine.step()
        except Exception as exc:  # a dead peer or a fault in the model: the model is lost
            traceback.print_exc()
            self.drop(key)
            self.send(ModelLost(self.worker_id, key, f"{type(exc).__name__}: {exc}"))
            return
        self.fair_share.charge(key, time.perf_counter() - started)
        if outputs:  # the engine's outputs are the protocol's TokenOutputs
            self.send(StepOutputs(self.worker_id, key, outputs))
        for request_id, error in model.engine.take_failures():
            self.send(RequestFailed(self.worker_id, key, request_id, error, invalid_request=True))

    # ---- idle gaps ------------------------------------------------------------------------

    def graphs_pending(self) -> bool:
        return any(
            model.engine.graph_buckets is not None and model.engine.graph_buckets.pending
            for model in self.resident.values()
        )

    def capture_graph_in_idle_gap(self) -> bool:
        """For the worker's idle gaps only (no resident model has work): captures one decode
        graph, the smallest bucket still to capture of any model that can take it now. Returns
        whether one was captured; a model whose capture fails runs its decodes eagerly."""
        ready = [model for model in self.resident.values() if model.engine.can_capture_graph()]
        if not ready:
            return False
        model = min(ready, key=lambda model: model.engine.graph_buckets.next_size)
        try:
            model.engine.capture_next_graph()
        except Exception:
            traceback.print_exc()
        return True

    # ---- load and drop --------------------------------------------------------------------

    def load(
        self, command: LoadModel, budget_bytes: int, segments: dict[str, SegmentWeights]
    ) -> Resident:
        """Builds the model; refusals and failures leave nothing behind and raise LoadRefused."""
        if command.deployment in self.resident:
            raise LoadRefused(f"{command.deployment} is already resident", ErrorKind.INVALID)
        in_group = [m.deployment for m in self.resident.values() if m.tp_size > 1]
        if in_group or (command.tp_size > 1 and self.resident):
            holder = in_group or list(self.resident)
            raise LoadRefused(
                f"a tensor-parallel model takes its workers alone (resident: {holder})",
                ErrorKind.BUSY,
            )
        try:
            if command.tp_size > 1:
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(
                    backend,
                    init_method=command.dist_init_method,
                    rank=command.tp_rank,
                    world_size=command.tp_size,
                    timeout=GROUP_TIMEOUT,
                    device_id=self.device if self.device.type == "cuda" else None,
                )
            engine = self._build_engine(command, budget_bytes, segments)
        except Exception as exc:
            self._leave_group()
            gc.collect()  # a failed build may leave tensors in the traceback's frames
            raise LoadRefused(str(exc), _error_kind(exc)) from None
        model = Resident(command.deployment, engine, command.tp_rank, command.tp_size)
        self.resident[command.deployment] = model
        self.fair_share.add(command.deployment)
        return model

    def _build_engine(
        self, command: LoadModel, budget_bytes: int, segments: dict[str, SegmentWeights]
    ) -> Engine:
        options = dict(
            device=self.device,
            dtype=command.dtype,
            max_model_len=command.max_model_len,
            engine_config=command.engine,
            memory_budget_bytes=budget_bytes,
        )
        if command.segment is None:
            return Engine.from_checkpoint(command.model_dir, **options)
        model_dir, config = read_model_config(command.model_dir)
        weights = segments.get(command.segment.shm_name)
        transient = weights is None or not weights.registered
        if weights is None:
            weights = SegmentWeights(command.segment)
        try:
            return Engine.create(
                config,
                weights,
                eos_token_ids=eos_token_ids(model_dir, config),
                tokenizer_dir=model_dir,
                **options,
            )
        finally:
            if transient and command.segment.shm_name not in segments:
                weights.close()

    def follow(self, model: Resident) -> None:
        """A follower rank mirrors the lead's steps until the lead releases it (at unload)."""
        try:
            model.engine.follow()
        except Exception as exc:
            self.drop(model.deployment)
            self.send(ModelLost(self.worker_id, model.deployment, f"{type(exc).__name__}: {exc}"))

    def drop(self, deployment: str) -> dict[str, float]:
        """Frees one model (and leaves its tensor-parallel group); safe for a model that is not
        resident. Its memory stays with the caching allocator: the owner decides when the
        driver gets it. Returns where the time went."""
        started = time.perf_counter()
        model = self.resident.pop(deployment, None)
        self.fair_share.remove(deployment)
        if model is not None:
            try:
                model.engine.close()
            except Exception:
                traceback.print_exc()  # a dead peer cannot be released; the memory still goes
        closed = time.perf_counter()
        if model is not None and model.tp_size > 1:
            self._leave_group()
        return {"close_s": closed - started, "leave_group_s": time.perf_counter() - closed}

    def drop_all(self) -> None:
        for deployment in list(self.resident):
            self.drop(deployment)

    def _leave_group(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                traceback.print_exc()

    def wait_for_copies(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _error_kind(exc: Exception) -> ErrorKind:
    if isinstance(exc, (CheckpointError, WeightLoadError)):
        return ErrorKind.CHECKPOINT
    if isinstance(exc, InsufficientMemory):
        return ErrorKind.INSUFFICIENT_MEMORY
    if isinstance(exc, ValueError):  # a shape or architecture the checkpoint cannot have
        return ErrorKind.INVALID
    return ErrorKind.INTERNAL

"""The models resident in one worker: building and dropping their engines, routing requests to
them by deployment id, and stepping them in turn.

A tensor-parallel model has a process group of its own on every rank; its lead steps it like
any other model and sends each step to the other ranks, which run it when it reaches them (see
worker/peers.py) and serve their other models in between.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from warmserve.engine.arena import shard_layout, store_shard
from warmserve.engine.engine import Engine, RequestRejected
from warmserve.engine.engine_build import build_engine, engine_from_checkpoint, eos_token_ids
from warmserve.engine.kv_pool import InsufficientMemory, KVPool
from warmserve.engine.tensor_parallel import DeploymentGroup
from warmserve.loader.checkpoint import CheckpointError, read_model_config
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.models.weights import WeightLoadError
from warmserve.protocol import (
    AbortRequest,
    AddRequest,
    ErrorKind,
    LeaveGroup,
    LoadModel,
    ModelLost,
    ModelWarm,
    RequestFailed,
    RunStep,
    StepOutputs,
    StoreShard,
    TensorEntry,
)
from warmserve.worker.fair_share import FairShare
from warmserve.worker.peers import PeerLinks


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
    group: DeploymentGroup | None = None
    followers: tuple[str, ...] = ()  # the lead's: the other ranks' peer addresses
    loaded_at: float = field(default_factory=time.monotonic)
    warm_reported: bool = False  # ModelWarm sent


class ResidentModels:
    def __init__(
        self,
        worker_id: int,
        device: torch.device,
        send: Callable[[object], None],
        peers: PeerLinks | None = None,
    ):
        self.worker_id = worker_id
        self.device = device
        self.send = send
        self.peers = peers
        self.resident: dict[str, Resident] = {}
        self.fair_share = FairShare()

    def engines(self) -> dict[str, Engine]:
        return {key: model.engine for key, model in self.resident.items()}

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
        # The resident models share one compute stream: a model whose weights are still being
        # copied would queue its wait for that copy on it, and every other model's step behind
        # that wait. It waits its turn until the copy is over, unless nothing else has work.
        ready = [key for key in busy if not self.resident[key].engine.weights_copying]
        key = self.fair_share.pick(ready or busy)
        model = self.resident[key]
        try:
            model.engine.capture_overdue_graph()
        except Exception:  # its decodes stay eager
            traceback.print_exc()
        started = time.perf_counter()
        try:
            outputs = model.engine.step()
            if len(busy) > 1:  # another model's step comes next: this one's tokens go now
                outputs += model.engine.resolve_in_flight()
        except Exception as exc:  # a dead peer or a fault in the model: the model is lost
            self._lost(key, exc)
            return
        elapsed = time.perf_counter() - started
        self.fair_share.charge(key, elapsed)
        if outputs:  # the engine's outputs are the protocol's TokenOutputs
            kind = model.engine.last_step_kind or ""
            self.send(StepOutputs(self.worker_id, key, outputs, kind, elapsed))
        for request_id, error in model.engine.take_failures():
            self.send(RequestFailed(self.worker_id, key, request_id, error, invalid_request=True))

    # ---- idle gaps ------------------------------------------------------------------------

    def idle_work_pending(self) -> bool:
        return any(not model.engine.settled for model in self.resident.values())

    def work_in_idle_gap(self) -> bool:
        """For the worker's idle gaps only (no resident model has work): one piece of a model's
        idle work (kernels to warm, a decode graph to capture), the most urgent of any model
        that can take it now. Returns whether there was one; a model whose capture fails runs
        its decodes eagerly."""
        for key, model in list(self.resident.items()):
            error = model.engine.weight_copy_error
            if error is not None:  # its weights never reached the device: the model is lost
                self._lost(key, error)
        ready = [model for model in self.resident.values() if model.engine.has_idle_work()]
        if not ready:
            return False
        model = min(ready, key=lambda model: model.engine.idle_work_priority())
        try:
            model.engine.do_idle_work()
        except Exception:
            traceback.print_exc()
        return True

    def report_warm(self) -> None:
        """Tells the server of each model whose idle work has just ended (ModelWarm)."""
        for model in self.resident.values():
            if not model.warm_reported and model.engine.settled:
                model.warm_reported = True
                seconds = time.monotonic() - model.loaded_at
                self.send(ModelWarm(self.worker_id, model.deployment, seconds))

    # ---- load and drop --------------------------------------------------------------------

    def load(
        self,
        command: LoadModel,
        budget_bytes: int,
        segments: dict[str, SegmentWeights],
        kv_pool: KVPool,
    ) -> Resident:
        """Builds the model, its KV cache a region of `kv_pool`, its cache at most what
        `budget_bytes` leaves after its weights; refusals and failures leave nothing behind
        and raise LoadRefused."""
        if command.deployment in self.resident:
            raise LoadRefused(f"{command.deployment} is already resident", ErrorKind.INVALID)
        group = None
        followers = tuple(command.peer_addresses[1:]) if command.tp_rank == 0 else ()
        try:
            started = time.perf_counter()
            if command.tp_size > 1:
                group = DeploymentGroup.form(
                    command.dist_init_method, command.tp_rank, command.tp_size, self.device
                )
            formed = time.perf_counter() - started
            engine = self._build_engine(command, budget_bytes, segments, kv_pool, group, followers)
            engine.load_phases["group_s"] = formed
        except Exception as exc:
            if group is not None:
                group.close(barrier=False)
            gc.collect()  # a failed build may leave tensors in the traceback's frames
            raise LoadRefused(str(exc), _error_kind(exc)) from None
        model = Resident(
            command.deployment, engine, command.tp_rank, command.tp_size, group, followers
        )
        self.resident[command.deployment] = model
        self.fair_share.add(command.deployment)
        return model

    def _build_engine(
        self,
        command: LoadModel,
        budget_bytes: int,
        segments: dict[str, SegmentWeights],
        kv_pool: KVPool,
        group: DeploymentGroup | None,
        followers: tuple[str, ...],
    ) -> Engine:
        options = dict(
            device=self.device,
            dtype=command.dtype,
            max_model_len=command.max_model_len,
            engine_config=command.engine,
            memory_budget_bytes=budget_bytes,
            kv_pool=kv_pool,
            kv_owner=command.deployment,
        )
        if group is not None:
            options["group"] = group.group
        if followers:
            deployment, peers = command.deployment, self.peers
            options["send_step"] = lambda inputs: peers.send(
                list(followers), RunStep(deployment, inputs)
            )
        if command.segment is None:
            return engine_from_checkpoint(command.model_dir, **options)
        model_dir, config = read_model_config(command.model_dir)
        weights = segments.get(command.segment.shm_name)
        transient = weights is None or not weights.registered
        if weights is None:
            weights = SegmentWeights(command.segment)
        source = weights.rank_view(command.tp_rank) if command.segment.ranks else weights
        engine = None
        try:
            engine = build_engine(
                config,
                source,
                eos_token_ids=eos_token_ids(model_dir, config),
                tokenizer_dir=model_dir,
                **options,
            )
            return engine
        finally:
            if transient and command.segment.shm_name not in segments:
                copy = engine.weights_ready if engine is not None else None
                if copy is not None:  # a copy in a thread still reads the mapping
                    copy.then(weights.close)
                else:
                    weights.close()

    def store_shard(self, command: StoreShard) -> None:
        """Writes this rank's parameters of a loaded model into its span of a shard segment."""
        model = self.resident.get(command.deployment)
        if model is None:
            raise LookupError(f"{command.deployment} is not resident")
        weights = SegmentWeights(command.segment)
        try:
            store_shard(model.engine.runner.model, weights.rank_view(command.rank))
        finally:
            weights.close()

    def shard_layout(self, deployment: str) -> list[TensorEntry]:
        """How a rank's parameters would lie in a span of the host store of their own."""
        return shard_layout(self.resident[deployment].engine.runner.model)

    def run_step(self, message: RunStep) -> None:
        """A rank other than the lead: runs one step of the lead's."""
        model = self.resident.get(message.deployment)
        if model is None:
            return  # dropped after a fault; the lead's collective fails and reports it
        try:
            model.engine.follow_step(message.inputs)
        except Exception as exc:
            self._lost(message.deployment, exc)

    def _lost(self, deployment: str, exc: BaseException) -> None:
        traceback.print_exception(exc)
        self.drop(deployment, together=False)
        self.send(ModelLost(self.worker_id, deployment, f"{type(exc).__name__}: {exc}"))

    def drop(self, deployment: str, together: bool = True) -> dict[str, float]:
        """Frees one model and leaves its tensor-parallel group; safe for a model that is not
        resident. `together`: the model's ranks leave together (the lead tells the others, and
        all of them meet at a barrier first); False for a model that failed, which each rank
        drops on its own. Its memory stays with the caching allocator: the owner decides when
        the driver gets it. Returns where the time went."""
        started = time.perf_counter()
        model = self.resident.pop(deployment, None)
        self.fair_share.remove(deployment)
        if model is None:
            return {"close_s": 0.0, "leave_group_s": 0.0}
        if model.followers and together:
            self.peers.send(list(model.followers), LeaveGroup(deployment))
        try:
            model.engine.close()
        except Exception:
            traceback.print_exc()  # the memory still goes
        closed = time.perf_counter()
        if model.group is not None:
            try:
                model.group.close(barrier=together)
            except Exception:
                traceback.print_exc()  # a dead peer cannot meet the barrier
        if model.followers:
            still_used = {a for m in self.resident.values() for a in m.followers}
            self.peers.forget(set(model.followers) - still_used)
        return {"close_s": closed - started, "leave_group_s": time.perf_counter() - closed}

    def drop_all(self) -> None:
        for deployment in list(self.resident):
            self.drop(deployment, together=False)

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

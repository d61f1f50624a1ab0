"""A worker process: started once per GPU, pre-warmed, then takes models in and out on command.

The worker knows nothing of the server but two socket addresses: it pulls commands from one and
pushes events to the other. While it holds a model and has requests, it runs the engine loop;
otherwise it waits for commands. With tensor parallelism the lead rank (0) runs the engine loop
and the other ranks mirror its steps until the lead releases them at unload.

Fault injection: with WARMSERVE_FAIL_WARMUP=1 in its environment a worker fails its warm-up (it
reports the failure and exits with status 1), so tests and operators can check how the server
handles a device that cannot start.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from warmserve.engine.engine import Engine, RequestRejected, eos_token_ids
from warmserve.engine.warmup import warm_up
from warmserve.loader.checkpoint import CheckpointError, read_model_config
from warmserve.loader.weight_store import SegmentWeights
from warmserve.models.weights import WeightLoadError
from warmserve.protocol import (
    AbortRequest,
    AddRequest,
    CommandDone,
    ForgetSegment,
    LoadModel,
    MemoryReleased,
    ModelLost,
    RegisterSegment,
    RequestFailed,
    SegmentRegistered,
    Shutdown,
    StepOutputs,
    UnloadModel,
    WorkerFailed,
    WorkerReady,
    command_decoder,
    event_encoder,
)

# Followers wait in a collective for the lead's next step for as long as the model stays loaded.
GROUP_TIMEOUT = timedelta(days=30)
IDLE_POLL_MS = 500
FAIL_WARMUP_ENV = "WARMSERVE_FAIL_WARMUP"


@dataclass(frozen=True)
class WorkerArgs:
    worker_id: int
    device: str  # "cpu" or "cuda:N"
    command_address: str
    event_address: str
    memory_budget_bytes: int | None  # CPU workers: the memory that stands in for a GPU's
    gpu_memory_utilization: float
    memory_release_delay_s: float  # see ServerConfig
    num_threads: int | None
    parent_pid: int


def worker_main(args: WorkerArgs) -> None:
    # Ctrl-C goes to the whole process group; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NVLink multicast (NVLS) stays off: the GPU hosts this runs on require it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(args.command_address)
    events = context.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    events.connect(args.event_address)
    try:
        Worker(args, commands, events).run()
    finally:
        commands.close(linger=0)
        events.close()
        context.term()


def release_cached_gpu_memory() -> None:
    """Returns the caching allocator's free blocks and cuBLAS's per-stream workspaces (the graph
    capture stream has its own) to the driver."""
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


class Worker:
    def __init__(self, args: WorkerArgs, commands: zmq.Socket, events: zmq.Socket):
        self.args = args
        self.commands = commands
        self.events = events
        self.device = torch.device(args.device)
        self.engine: Engine | None = None
        self.load_command_id = 0  # of the LoadModel that built `engine`
        self.tp_rank = 0
        self.tp_size = 1
        # Host-store segments mapped and registered for DMA, kept across loads.
        self.segments: dict[str, SegmentWeights] = {}
        self.forgotten: set[str] = set()
        self.registered_events: list[SegmentRegistered] = []
        # When the device memory kept by the caching allocator goes back to the driver (None:
        # nothing pending). An unload keeps it so that a load right after reuses it.
        self.release_due: float | None = None

    def send(self, event) -> None:
        self.events.send(event_encoder.encode(event))

    # ---- memory figures -------------------------------------------------------------------

    def memory_total(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[1]
        return self.args.memory_budget_bytes or 0

    def memory_used(self) -> int:
        if self.device.type == "cuda":  # reserved, not allocated: what other processes can't use
            return torch.cuda.memory_reserved(self.device)
        return self.engine.memory_bytes if self.engine is not None else 0

    def memory_budget(self) -> int | None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Memory this process keeps cached (an unloaded model's) is free for the next one.
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
            return int(free + cached - (1.0 - self.args.gpu_memory_utilization) * total)
        return self.args.memory_budget_bytes

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.warm_up()
        except Exception as exc:
            traceback.print_exc()
            self.send(WorkerFailed(self.args.worker_id, f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None
        self.send(
            WorkerReady(
                worker_id=self.args.worker_id,
                pid=os.getpid(),
                device=str(self.device),
                memory_total_bytes=self.memory_total(),
                memory_used_bytes=self.memory_used(),
                warmup_seconds=time.perf_counter() - started,
            )
        )
        while True:
            while self.registered_events:
                self.send(self.registered_events.pop(0))
            busy = self.engine is not None and self.engine.has_unfinished_requests()
            if not self.commands.poll(0 if busy else self.idle_poll_ms()):
                if busy:
                    self.step()
                elif self.release_due is not None and time.monotonic() >= self.release_due:
                    self.release_memory()
                elif os.getppid() != self.args.parent_pid:
                    return  # the server is gone
                continue
            while True:
                command = command_decoder.decode(self.commands.recv())
                if isinstance(command, Shutdown):
                    self.drop_model()
                    return
                self.handle(command)
                if not self.commands.poll(0):
                    break

    def idle_poll_ms(self) -> int:
        if self.release_due is None:
            return IDLE_POLL_MS
        return max(0, min(IDLE_POLL_MS, int((self.release_due - time.monotonic()) * 1000) + 1))

    def release_memory(self) -> None:
        """Hands the caching allocator's unused device memory to the driver (all of it when no
        model is loaded), and tells the controller what the worker holds now."""
        self.release_due = None
        if self.engine is None:
            release_cached_gpu_memory()
        else:
            torch.cuda.empty_cache()
        self.send(MemoryReleased(self.args.worker_id, self.memory_used()))

    def warm_up(self) -> None:
        if os.environ.get(FAIL_WARMUP_ENV) == "1":
            raise RuntimeError(
                f"fault injected by {FAIL_WARMUP_ENV}=1 (unset it to start normally)"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        warm_up(self.device, "bfloat16" if self.device.type == "cuda" else "float32")
        if self.device.type == "cuda":
            release_cached_gpu_memory()  # the idle figure is then what an unload returns to

    def handle(self, command) -> None:
        if isinstance(command, AddRequest):
            self.add_request(command)
        elif isinstance(command, AbortRequest):
            if self.engine is not None:
                self.engine.abort_request(command.request_id)
        elif isinstance(command, LoadModel):
            self.load(command)
        elif isinstance(command, UnloadModel):
            self.unload(command)
        elif isinstance(command, RegisterSegment):
            if self.device.type == "cuda":
                threading.Thread(target=self.register, args=(command.segment,), daemon=True).start()
        elif isinstance(command, ForgetSegment):
            self.forget(command.shm_name)

    def register(self, segment) -> None:
        """Background thread: registering pins pages, about half a second per GiB."""
        started = time.perf_counter()
        try:
            weights = SegmentWeights(segment)
            weights.register_for_dma()
        except Exception:
            traceback.print_exc()  # loads still work from the unregistered mapping
            return
        if segment.shm_name in self.forgotten:
            weights.close()
            return
        self.segments[segment.shm_name] = weights
        # zmq sockets are not thread-safe: the main loop sends this on the thread's behalf.
        self.registered_events.append(
            SegmentRegistered(self.args.worker_id, segment.shm_name, time.perf_counter() - started)
        )

    def forget(self, shm_name: str) -> None:
        weights = self.segments.pop(shm_name, None)
        if weights is None:
            self.forgotten.add(shm_name)
        else:
            torch.cuda.synchronize(self.device)  # a load's copy from it may still be running
            weights.close()

    def add_request(self, command: AddRequest) -> None:
        if self.engine is None:
            self.send(RequestFailed(self.args.worker_id, command.request_id, "no model is loaded"))
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.sampling)
        except (RequestRejected, ValueError) as exc:
            self.send(RequestFailed(self.args.worker_id, command.request_id, str(exc)))

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a dead peer or a fault in the model: the model is lost
            traceback.print_exc()
            self.drop_model()
            self.model_lost(exc)
            return
        if outputs:
            self.send(StepOutputs(self.args.worker_id, outputs))

    # ---- load and unload ------------------------------------------------------------------

    def load(self, command: LoadModel) -> None:
        started = time.perf_counter()
        if self.engine is not None:
            self.reply(command.command_id, error="a model is already loaded", error_type="Busy")
            return
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
            self.tp_rank, self.tp_size = command.tp_rank, command.tp_size
            self.engine = self.build_engine(command)
            self.load_command_id = command.command_id
            if self.release_due is not None:  # what the new model did not reuse goes back later
                self.release_due = time.monotonic() + self.args.memory_release_delay_s
        except Exception as exc:
            self.drop_model()
            gc.collect()  # a failed build may leave tensors in the traceback's frames
            bad_checkpoint = isinstance(exc, (CheckpointError, WeightLoadError))
            error_type = "CheckpointError" if bad_checkpoint else type(exc).__name__
            self.reply(command.command_id, error=str(exc), error_type=error_type)
            return
        self.reply(
            command.command_id,
            max_model_len=self.engine.max_model_len,
            seconds=time.perf_counter() - started,
            phases=self.engine.load_phases,
        )
        if self.tp_rank > 0:
            self.follow()

    def build_engine(self, command: LoadModel) -> Engine:
        options = dict(
            device=self.device,
            dtype=command.dtype,
            max_model_len=command.max_model_len,
            engine_config=command.engine,
            memory_budget_bytes=self.memory_budget(),
        )
        if command.segment is None:
            return Engine.from_checkpoint(command.model_dir, **options)
        model_dir, config = read_model_config(command.model_dir)
        weights = self.segments.get(command.segment.shm_name)
        transient = weights is None or not weights.registered
        if weights is None:
            weights = SegmentWeights(command.segment)
        try:
            return Engine.create(
                config, weights, eos_token_ids=eos_token_ids(model_dir, config), **options
            )
        finally:
            if transient and command.segment.shm_name not in self.segments:
                weights.close()

    def follow(self) -> None:
        try:
            self.engine.follow()
        except Exception as exc:
            self.drop_model()
            self.model_lost(exc)

    def model_lost(self, exc: Exception) -> None:
        self.send(
            ModelLost(self.args.worker_id, f"{type(exc).__name__}: {exc}", self.load_command_id)
        )

    def unload(self, command: UnloadModel) -> None:
        started = time.perf_counter()
        phases = self.drop_model(release_now=False)
        self.reply(command.command_id, seconds=time.perf_counter() - started, phases=phases)

    def drop_model(self, release_now: bool = True) -> dict[str, float]:
        """Frees the model and leaves the tensor-parallel group; safe to call in any state.
        Without `release_now`, a GPU's memory stays with the caching allocator for the next load
        and goes to the driver after the release delay. Returns where the time went."""
        started = time.perf_counter()
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception:
                traceback.print_exc()  # a dead peer cannot be released; the memory still goes
        closed = time.perf_counter()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                traceback.print_exc()
        self.tp_rank, self.tp_size = 0, 1
        left = time.perf_counter()
        if self.device.type == "cuda":
            if release_now or self.args.memory_release_delay_s <= 0:
                self.release_due = None
                release_cached_gpu_memory()
            else:
                self.release_due = time.monotonic() + self.args.memory_release_delay_s
        return {
            "close_s": closed - started,
            "leave_group_s": left - closed,
            "release_memory_s": time.perf_counter() - left,
        }

    def reply(self, command_id: int, **fields) -> None:
        self.send(
            CommandDone(
                worker_id=self.args.worker_id,
                command_id=command_id,
                memory_used_bytes=self.memory_used(),
                **fields,
            )
        )

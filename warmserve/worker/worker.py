"""A worker process: started once per GPU, pre-warmed, then takes models in and out on command.

The worker knows nothing of the server but two socket addresses: it pulls commands from one and
pushes events to the other. It holds any number of models, each with its own engine; its loop
drains the commands, then steps one engine that has work, chosen by fair share of device time
(`fair_share.py`). With tensor parallelism the lead rank (0) steps the engine and sends each step
to the other ranks (`peers.py`), which run it when their loop reaches it and serve their other
models in between. The lead also tells them when to form the model's group and when to leave it,
on the same ordered socket as the steps: a rank never blocks in a group's rendezvous or barrier
while the lead still waits for it to run an earlier step.

Fault injection: with WARMSERVE_FAIL_WARMUP=1 in its environment a worker fails its warm-up (it
reports the failure and exits with status 1), so tests and operators can check how the server
handles a device that cannot start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback

import torch
import zmq

from warmserve.curve import as_client
from warmserve.engine.warmup import warm_up
from warmserve.loader.segment_weights import SegmentWeights
from warmserve.process_gc import freeze_startup_objects
from warmserve.profiling import WORKER_PROFILE_ENV, profiled
from warmserve.protocol import (
    AbortRequest,
    AddRequest,
    CommandDone,
    ErrorKind,
    ForgetSegment,
    JoinGroup,
    LeaveGroup,
    LoadModel,
    MemoryReleased,
    RegisterSegment,
    RunStep,
    SegmentRegistered,
    Shutdown,
    StoreShard,
    UnloadModel,
    WorkerArgs,
    WorkerFailed,
    WorkerReady,
    command_decoder,
    event_encoder,
)
from warmserve.worker.device_memory import DeviceMemory
from warmserve.worker.kv_memory import KVMemory
from warmserve.worker.peers import PeerLinks
from warmserve.worker.residents import LoadRefused, ResidentModels

IDLE_POLL_MS = 500
# While a resident model has idle work left (see ResidentModels.work_in_idle_gap), the loop checks
# for commands this often.
CAPTURE_POLL_MS = 1
FAIL_WARMUP_ENV = "WARMSERVE_FAIL_WARMUP"


def worker_main(args: WorkerArgs) -> None:
    # Ctrl-C goes to the whole process group; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NVLink multicast (NVLS) stays off: the GPU hosts this runs on require it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    events = context.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    if args.curve is not None:
        keys = args.curve
        for sock in (commands, events):
            as_client(sock, keys.server_public, keys.client_public, keys.client_secret)
    commands.connect(args.command_address)
    events.connect(args.event_address)
    peers = PeerLinks(context, args.peer_address, args.curve)
    prefix = os.environ.get(WORKER_PROFILE_ENV)
    try:
        with profiled(f"{prefix}.worker{args.worker_id}" if prefix else None):
            Worker(args, commands, events, peers).run()
    finally:
        commands.close(linger=0)
        events.close()
        peers.close()
        context.term()


class Worker:
    def __init__(
        self,
        args: WorkerArgs,
        commands: zmq.Socket,
        events: zmq.Socket,
        peers: PeerLinks | None = None,
    ):
        self.args = args
        self.commands = commands
        self.events = events
        self.peers = peers
        self.poller = zmq.Poller()
        for socket in (commands, peers.inbox if peers else None):
            if socket is not None:
                self.poller.register(socket, zmq.POLLIN)
        self.device = torch.device(args.device)
        self.memory = DeviceMemory(self.device, args.memory_cap_bytes, args.gpu_memory_utilization)
        self.kv = KVMemory(self.memory)
        self.models = ResidentModels(args.worker_id, self.device, self.send, peers)
        # A rank other than the lead of a tensor-parallel model joins its group when both its
        # LoadModel and the lead's JoinGroup are here (they come on different sockets), and
        # leaves it when the lead's LeaveGroup comes (its UnloadModel waits for that).
        self.awaiting_join: dict[str, LoadModel] = {}
        self.joins_due: set[str] = set()
        self.awaiting_leave: dict[str, UnloadModel] = {}
        # Host-store segments mapped and registered for DMA, kept across loads.
        self.segments: dict[str, SegmentWeights] = {}
        self.forgotten: set[str] = set()
        self.registered_events: list[SegmentRegistered] = []
        # When the device memory kept by the caching allocator goes back to the driver (None:
        # nothing pending). An unload keeps it so that a load right after reuses it; it goes
        # back only in an idle gap, since emptying the cache stalls the models still stepping.
        self.release_due: float | None = None

    def send(self, event) -> None:
        self.events.send(event_encoder.encode(event))

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.warm_up()
        except Exception as exc:
            traceback.print_exc()
            self.send(WorkerFailed(self.args.worker_id, f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None
        freeze_startup_objects()  # before any model: an unloaded model's objects stay collectable
        self.send(
            WorkerReady(
                worker_id=self.args.worker_id,
                pid=os.getpid(),
                device=str(self.device),
                memory_total_bytes=self.memory.total(),
                memory_used_bytes=self.memory_used(),
                memory_usable_bytes=self.memory.usable(),
                warmup_seconds=time.perf_counter() - started,
                peer_address=self.peers.address if self.peers is not None else "",
            )
        )
        while self.turn():
            pass

    def turn(self) -> bool:
        """One pass of the loop: the commands waiting, else one engine step, else idle work (an
        unloaded cache to unmap, a graph to capture, memory to release). False once the worker
        is to stop."""
        while self.registered_events:
            self.send(self.registered_events.pop(0))
        self.drain_peers()  # first: a lead waits in a collective for these steps
        report = self.kv.report(self.args.worker_id, self.models.engines())
        if report is not None:
            self.send(report)
        busy = self.models.busy()
        if busy:
            timeout = 0
        elif self.models.idle_work_pending() or self.kv.retiring:
            timeout = CAPTURE_POLL_MS
        else:
            timeout = self.idle_poll_ms()
        ready = dict(self.poller.poll(timeout))
        if self.commands in ready:
            return self.drain_commands()
        if ready:
            return True  # a peer message: handled at the top of the next turn
        if busy:
            self.models.step_next(busy)
        elif self.kv.retiring:  # an unloaded model's cache range, still mapped
            self.kv.pool.finish_retired()
        elif self.models.work_in_idle_gap():
            self.models.report_warm()  # one piece at a time: a command that came goes first
        elif self.release_due is not None and time.monotonic() >= self.release_due:
            self.release_memory()
        elif os.getppid() != self.args.parent_pid:
            return False  # the server is gone
        return True

    def drain_commands(self) -> bool:
        """Handles every command waiting; False once told to shut down."""
        while True:
            command = command_decoder.decode(self.commands.recv())
            if isinstance(command, Shutdown):
                self.models.drop_all()
                return False
            self.handle(command)
            if not self.commands.poll(0):
                return True

    def drain_peers(self) -> None:
        while self.peers is not None and (message := self.peers.receive()) is not None:
            if isinstance(message, RunStep):
                self.models.run_step(message)
            elif isinstance(message, JoinGroup):
                command = self.awaiting_join.pop(message.deployment, None)
                if command is None:
                    self.joins_due.add(message.deployment)
                else:
                    self.load(command)
            elif isinstance(message, LeaveGroup):
                self.unload(self.awaiting_leave.pop(message.deployment, None), message.deployment)

    def idle_poll_ms(self) -> int:
        if self.release_due is None:
            return IDLE_POLL_MS
        return max(0, min(IDLE_POLL_MS, int((self.release_due - time.monotonic()) * 1000) + 1))

    def release_memory(self) -> None:
        """Hands the caching allocator's unused device memory to the driver (all of it, and the
        KV pool's idle pages, when no model is resident), and tells the controller what the
        worker holds now."""
        self.release_due = None
        if not self.models.resident:  # no cache left to grow: the pool's pages go too
            self.kv.pool.release_all_idle()
        self.memory.release(keep_nothing=not self.models.resident)
        self.send(
            MemoryReleased(
                self.args.worker_id,
                self.memory_used(),
                self.memory_free(),
            )
        )

    def memory_used(self) -> int:
        return self.kv.used(list(self.models.engines().values()))

    def memory_free(self) -> int:
        return self.kv.free(list(self.models.engines().values()))

    def warm_up(self) -> None:
        if os.environ.get(FAIL_WARMUP_ENV) == "1":
            raise RuntimeError(
                f"fault injected by {FAIL_WARMUP_ENV}=1 (unset it to start normally)"
            )
        if self.memory.on_gpu:
            torch.cuda.set_device(self.device)
        warm_up(self.device, "bfloat16" if self.memory.on_gpu else "float32")
        if self.memory.on_gpu:
            self.memory.release(keep_nothing=True)  # the idle figure is what unloads return to
        self.memory.mark_baseline()
        self.kv.start()

    def handle(self, command) -> None:
        if isinstance(command, AddRequest):
            self.models.add_request(command)
        elif isinstance(command, AbortRequest):
            self.models.abort_request(command)
        elif isinstance(command, LoadModel):
            self.take_load(command)
        elif isinstance(command, UnloadModel):
            self.take_unload(command)
        elif isinstance(command, RegisterSegment):
            if self.memory.on_gpu:
                threading.Thread(target=self.register, args=(command.segment,), daemon=True).start()
        elif isinstance(command, StoreShard):
            try:
                self.models.store_shard(command)
            except Exception as exc:
                traceback.print_exc()
                self.reply(command.command_id, error=str(exc), error_kind=ErrorKind.INTERNAL)
            else:
                self.reply(command.command_id)
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
            # A load's copy from it may still be running on the copy stream.
            self.models.wait_for_copies()
            weights.close()

    # ---- load and unload ------------------------------------------------------------------

    def take_load(self, command: LoadModel) -> None:
        if command.tp_rank == 0:
            if command.tp_size > 1:
                self.peers.send(command.peer_addresses[1:], JoinGroup(command.deployment))
            self.load(command)
        elif command.deployment in self.joins_due:
            self.joins_due.discard(command.deployment)
            self.load(command)
        else:
            self.awaiting_join[command.deployment] = command

    def take_unload(self, command: UnloadModel) -> None:
        model = self.models.resident.get(command.deployment)
        if model is not None and model.tp_rank > 0 and not command.failed:
            self.awaiting_leave[command.deployment] = command  # see drain_peers
            return
        waiting = self.awaiting_join.pop(command.deployment, None)
        if waiting is not None:  # its lead is gone before the group formed
            self.reply(
                waiting.command_id,
                error="the model was unloaded before its group formed",
                error_kind=ErrorKind.INTERNAL,
            )
        self.joins_due.discard(command.deployment)
        earlier = self.awaiting_leave.pop(command.deployment, None)
        self.unload(command, command.deployment, together=not command.failed)
        if earlier is not None:
            self.reply(earlier.command_id)

    def load(self, command: LoadModel) -> None:
        started = time.perf_counter()
        budget = self.kv.kv_budget(list(self.models.engines().values()))
        need = command.memory_budget_bytes
        if need is not None and not self.kv.make_room(command.deployment, need):
            self.reply(
                command.command_id,
                error=f"the KV blocks in use on worker {self.args.worker_id} leave less than "
                f"the {need / 2**30:.2f} GiB the model needs",
                error_kind=ErrorKind.INSUFFICIENT_MEMORY,
            )
            return
        try:
            resident = self.models.load(command, budget, self.segments, self.kv.pool)
        except LoadRefused as refusal:
            self.kv.forget(command.deployment)
            self.reply(command.command_id, error=str(refusal), error_kind=refusal.kind)
            return
        if self.release_due is not None:  # what the new model did not reuse goes back later
            self.release_due = time.monotonic() + self.args.memory_release_delay_s
        self.reply(
            command.command_id,
            max_model_len=resident.engine.max_model_len,
            model_bytes=resident.engine.footprint_bytes,
            seconds=time.perf_counter() - started,
            phases=resident.engine.load_phases,
            # The store keeps a rank's shard once it has one: until then, each load slices.
            shard=self.models.shard_layout(command.deployment)
            if command.tp_size > 1 and command.segment is not None and not command.segment.ranks
            else [],
        )
        self.models.report_warm()  # a model without idle work is warm at once

    def unload(self, command: UnloadModel | None, deployment: str, together: bool = True) -> None:
        """Drops the model, and replies to `command` (None: the server has not asked yet)."""
        started = time.perf_counter()
        phases = self.models.drop(deployment, together)
        if self.memory.on_gpu:
            if self.args.memory_release_delay_s <= 0:
                self.release_memory()
            else:
                self.release_due = time.monotonic() + self.args.memory_release_delay_s
        if command is not None:
            self.reply(command.command_id, seconds=time.perf_counter() - started, phases=phases)

    def reply(self, command_id: int, **fields) -> None:
        self.send(
            CommandDone(
                worker_id=self.args.worker_id,
                command_id=command_id,
                memory_used_bytes=self.memory_used(),
                memory_free_bytes=self.memory_free(),
                **fields,
            )
        )

"""Every message that crosses a process boundary between the server and its workers.

msgspec structs in one tagged union per direction, so a socket carries one type and a decoder
knows every message. Addresses are strings (`ipc://…` for local workers, `tcp://…` with CURVE
keys for workers on other hosts): nothing here assumes the workers share the server's host.
"""

from __future__ import annotations

import enum

import msgspec

from warmserve.config import EngineConfig, SamplingParams


class ErrorKind(enum.Enum):
    """Why a worker refused a command: the server maps each kind to one of its own errors, so
    no exception class name crosses the process boundary."""

    CHECKPOINT = "checkpoint"  # the checkpoint cannot be read or does not fit its architecture
    INSUFFICIENT_MEMORY = "insufficient_memory"
    INVALID = "invalid"  # the command asks for something this model or worker cannot do
    INTERNAL = "internal"


class CurveKeys(msgspec.Struct, frozen=True):
    """ZeroMQ CURVE keys (Z85) of a worker's connections over tcp://: the server's public key,
    which the worker checks, and the workers' key pair, which the server and the workers' peer
    inboxes let in; nothing without it is heard (warmserve/curve.py)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes


class WorkerArgs(msgspec.Struct, frozen=True):
    """What a worker process is started with: its identity, its device and its addresses."""

    worker_id: int
    device: str  # "cpu" or "cuda:N"
    command_address: str
    event_address: str
    # The most memory warmserve may use on this worker (None: no cap); a CPU worker stands in
    # for a GPU of this size.
    memory_cap_bytes: int | None
    gpu_memory_utilization: float
    memory_release_delay_s: float  # see ServerConfig
    num_threads: int | None
    parent_pid: int  # the process that started the worker: it exits when that one is gone
    # Where this worker binds the inbox that takes the steps of the tensor-parallel models it
    # follows (PeerMessage), as its launcher made it; where it is bound comes in WorkerReady.
    peer_address: str
    curve: CurveKeys | None = None  # set for tcp:// addresses


class TensorEntry(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: list[int]
    offset: int  # byte offset in the weight segment
    nbytes: int


class RankShard(msgspec.Struct, array_like=True, frozen=True):
    """One tensor-parallel rank's parameters in a segment: one contiguous span, in forward order,
    so that loading the rank is one copy."""

    offset: int  # where the span starts in the segment
    size: int
    tensors: list[TensorEntry]  # named by parameter, offsets from the span's start


class WeightSegment(msgspec.Struct, frozen=True):
    """A model's weights in host shared memory, as the host weight store laid them out: the
    checkpoint's tensors (`tensors`), or a tensor-parallel model's shards, one span per rank
    (`ranks`)."""

    shm_name: str
    size: int
    tensors: list[TensorEntry]
    ranks: list[RankShard] = []


# ---- server -> worker ----------------------------------------------------------------------


class LoadModel(msgspec.Struct, tag=True, frozen=True):
    command_id: int
    deployment: str  # unique per load; every later message about this model carries it
    name: str
    model_dir: str
    segment: WeightSegment | None  # None: read the checkpoint from disk
    dtype: str
    max_model_len: int | None
    engine: EngineConfig
    tp_rank: int
    tp_size: int
    dist_init_method: str | None  # tcp://host:port of the group's rendezvous when tp_size > 1
    # What the controller's ledger grants this model on this worker (None: whatever is free).
    memory_budget_bytes: int | None = None
    # Every rank's peer address, by rank: the lead sends the other ranks their steps there.
    peer_addresses: list[str] = []


class UnloadModel(msgspec.Struct, tag=True, frozen=True):
    command_id: int
    deployment: str
    # The model failed (a rank died or lost it): each rank drops it at once, without waiting
    # for the lead to release the group.
    failed: bool = False


class AddRequest(msgspec.Struct, tag=True, frozen=True):
    deployment: str
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams  # stop strings travel too; the server applies them


class AbortRequest(msgspec.Struct, tag=True, frozen=True):
    deployment: str
    request_id: str


class RegisterSegment(msgspec.Struct, tag=True, frozen=True):
    """Map a new host-store segment and register it for DMA in the background (GPU workers)."""

    segment: WeightSegment


class StoreShard(msgspec.Struct, tag=True, frozen=True):
    """Write this rank's parameters of a loaded tensor-parallel model into its span of a new
    segment (`segment.ranks[rank]`, laid out as the rank's load reply said)."""

    command_id: int
    deployment: str
    segment: WeightSegment
    rank: int


class ForgetSegment(msgspec.Struct, tag=True, frozen=True):
    shm_name: str


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


WorkerCommand = (
    LoadModel
    | UnloadModel
    | AddRequest
    | AbortRequest
    | RegisterSegment
    | StoreShard
    | ForgetSegment
    | Shutdown
)


# ---- lead worker -> the other ranks of a tensor-parallel model -----------------------------
# One socket from the lead to each other rank carries these in order, so a rank runs a model's
# steps, joins its group and leaves it in the order the lead issued them.


class StepInputs(msgspec.Struct, array_like=True):
    """What every rank needs to run one forward: plain lists, cheap to encode."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    # Rows of input_ids whose logits score a prompt (see engine/logprobs.py); usually none.
    prompt_rows: list[int] = []
    # The lead's KV block count: the other ranks map as many pages before they run the step.
    kv_blocks: int = 0


class JoinGroup(msgspec.Struct, tag=True, frozen=True):
    """The lead is forming the model's group now: join it (with the rank's LoadModel)."""

    deployment: str


class RunStep(msgspec.Struct, tag=True, frozen=True):
    deployment: str
    inputs: StepInputs


class LeaveGroup(msgspec.Struct, tag=True, frozen=True):
    """The lead unloads the model: drop it and leave its group, after a barrier with the other
    ranks, so that no rank tears the group down under another's last step. (A model that failed
    is dropped by each rank on its own, on the server's UnloadModel.)"""

    deployment: str


PeerMessage = JoinGroup | RunStep | LeaveGroup


# ---- worker -> server ----------------------------------------------------------------------


class WorkerReady(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    pid: int
    device: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_usable_bytes: int  # what models may take on this worker, all of them together
    warmup_seconds: float
    peer_address: str = ""  # where its peer inbox is bound (see WorkerArgs.peer_address)


class WorkerFailed(msgspec.Struct, tag=True, frozen=True):
    """The worker could not finish its warm-up and is about to exit."""

    worker_id: int
    error: str  # "ExceptionType: message"


class CommandDone(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    command_id: int
    error: str | None = None
    error_kind: ErrorKind | None = None
    memory_used_bytes: int = 0
    memory_free_bytes: int = 0  # what the worker measures as free for another model
    model_bytes: int = 0  # a load: what the model takes (weights, KV cache, activations)
    max_model_len: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = {}  # where a load's or unload's time went
    # A tensor-parallel rank loaded from the checkpoint's tensors: how its parameters would lie
    # in a span of their own (offsets from its start), for the store to keep them so.
    shard: list[TensorEntry] = []


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """The sampled token's log-probability and the most likely tokens', most likely first."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class TokenOutput(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    token_id: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # only for requests that ask for them
    # With a request's first token, when it asks: one per prompt token after the first.
    prompt_logprobs: list[TokenLogprobs] | None = None


class StepOutputs(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    deployment: str
    outputs: list[TokenOutput]
    # The step the worker ran for them: its kind (engine/model_runner.STEP_KINDS) and how long
    # the engine's step call took on the host.
    step_kind: str = ""
    step_seconds: float = 0.0


class RequestFailed(msgspec.Struct, tag=True, frozen=True):
    worker_id: int
    deployment: str
    request_id: str
    error: str
    # The request itself is at fault (a grammar that does not compile): the client gets a 400.
    invalid_request: bool = False


class ModelLost(msgspec.Struct, tag=True, frozen=True):
    """A step failed (a fault in the model, or a tensor-parallel peer died): the worker dropped
    the model."""

    worker_id: int
    deployment: str
    error: str


class ModelWarm(msgspec.Struct, tag=True, frozen=True):
    """A loaded model's idle-gap work is done (its step kernels compiled, its decode graphs
    captured): no request of it waits for that work from now on. Sent once per load, at once
    for a model that has none."""

    worker_id: int
    deployment: str
    seconds: float  # from the end of the load


class SegmentRegistered(msgspec.Struct, tag=True, frozen=True):
    """A host-store segment is now registered for DMA in this worker: reloads copy at full speed."""

    worker_id: int
    shm_name: str
    seconds: float


class MemoryReleased(msgspec.Struct, tag=True, frozen=True):
    """The worker handed the device memory it kept after an unload (or a load) to the driver."""

    worker_id: int
    memory_used_bytes: int
    memory_free_bytes: int


class ModelKV(msgspec.Struct, array_like=True, frozen=True):
    mapped_bytes: int  # pages of the worker's KV pool mapped into the model's cache
    used_bytes: int  # blocks that sequences hold (cached prefixes not counted)
    # Mapped beyond the model's footprint and not reclaimable (blocks in use hold it): the
    # worker's free memory is that much lower until the sequences end, or the model goes.
    held_beyond_footprint_bytes: int


class KVUsage(msgspec.Struct, tag=True, frozen=True):
    """The worker's KV pool now, sent when it changed (at most a few times a second): each
    resident model's cache, what the pool may still map, and what is free for another model."""

    worker_id: int
    pool_free_bytes: int
    memory_free_bytes: int
    models: dict[str, ModelKV]  # deployment id -> its cache


WorkerEvent = (
    WorkerReady
    | WorkerFailed
    | CommandDone
    | StepOutputs
    | RequestFailed
    | ModelLost
    | ModelWarm
    | SegmentRegistered
    | MemoryReleased
    | KVUsage
)

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(WorkerCommand)
event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
peer_encoder = msgspec.msgpack.Encoder()
peer_decoder = msgspec.msgpack.Decoder(PeerMessage)

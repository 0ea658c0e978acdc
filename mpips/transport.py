"""The transport layer: parameter windows, tagged push messages, pull requests, cheap waits.

Roles call these classes and never MPI point-to-point or RMA directly. Buffers are plain,
contiguous numpy arrays (host memory), so other buffer kinds can replace them later.

Chunks. No MPI call here moves more than ``chunk_bytes`` bytes (``--chunk-bytes``, capped at
``MAX_CHUNK_BYTES``, 1 GiB; see ``mpips.chunking``): Open MPI 4.1 is MPI-3.1, whose counts are C
ints, so one call of more than 2**31-1 elements fails. Every transfer goes through
``send_chunks`` / ``recv_chunks`` / ``get_chunks``, which cut a buffer's bytes with
``chunks(nbytes, chunk_bytes)`` into consecutive ranges of ``chunk_bytes`` (the last shorter)
and move each range as bytes (``MPI.BYTE``) with one call. MPI keeps the messages of one
sender, tag and communicator in order, so the chunks of a transfer need no sequence numbers;
sender and receiver cut with the same ``chunk_bytes`` (one setting for the whole job).

Wire format of a push (worker -> server), protocol 2. Its payload is laid out by the server's
``PushLayout``: the gradient slice cut into chunks (``mpips.compression.chunk_ranges``,
``chunk_bytes // 4`` elements), chunk ``c`` in a slot of ``slots[c]`` bytes (``Codec.RAW32``: its
float32 values, exactly; a codec: its self-describing record, at most ``max_record_bytes``, see
``mpips.compression``), then one uint8 per tensor run of the shard (the mask, 1 = that tensor got
a gradient). Two forms, by size alone:

- **One message** (tag ``PUSH``) where ``HEADER_BYTES`` + the largest payload fits one chunk: the
  64-byte ``PushHeader`` (with the gradient norm and loss), then the payload. Sent after backward.
  JOIN and STOP pushes (no payload) are always one message.
- **Streamed** otherwise (``Pusher.begin`` / ``send_chunk`` / ``end``), in this order: the header
  alone (``PUSH``, flag ``STREAMED``, ``length`` = the layout's largest payload; no norm or loss:
  what is known before backward), sent with the first chunk; then the chunks **last first**
  (``PUSH_DATA``), each as soon as backward has finished it, one message per slot
  (``chunks(slot, chunk_bytes)`` messages where a codec's bound outgrows a chunk; a record
  shorter than its slot leaves the last ones short or empty);
  then the **tail** (``PUSH_TAIL``): the mask and a 32-byte ``PushTrailer`` (worker, step, the
  whole gradient's norm, loss), its last message with ``Issend``. ``Pusher.push`` sends a streamed
  push all at once after backward, in the same messages (fp16, GPU workers, a push without
  backward).

MPI keeps the messages of one sender, tag and communicator in order, so chunks need no sequence
numbers: the server posts its receives in the order they are sent. ``PushReceiver`` validates a
header as soon as it arrives, before it receives anything more, checks every chunk's size and the
trailer (the header's worker and step), and hands a push on only once its tail is in: with the
trailer's norm and loss in the header, and the payload laid out as a one-message push's (records
moved together where one is shorter than its slot). Nothing is applied before a whole push is in
and valid (``MalformedMessage`` otherwise, naming the worker). The ``Issend`` keeps a push in
flight (``--max-inflight``) until the server has matched its last message, whatever the MPI's
eager limit.

A window holds a 64-byte status block (int64 slots, see ``Slot``) followed by the shard (float32,
or bf16/fp16 with ``--pull-codec``: pulls widen it);
a window pull ``Rget``s the status block, then the shard in chunks, under one shared lock. A
message pull (tag ``PULL_REQUEST``, one int64: the clock needed) is answered with the same bytes
(status block + shard) in chunks, tag ``PULL_REPLY``. The final parameters go from each server
to the lead worker in chunks, tag ``FINAL``; checkpoint pieces, where h5py has no MPI-IO, go to
rank 0 in chunks, tag ``CHECKPOINT``.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips import faults
from mpips.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, chunks

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "HEADER_BYTES",
    "MAX_CHUNK_BYTES",
    "Backoff",
    "Codec",
    "MalformedMessage",
    "MessagePuller",
    "NoticeReceiver",
    "NoticeSender",
    "ParameterWindow",
    "PullServer",
    "PushHeader",
    "PushLayout",
    "PushTrailer",
    "PULL_CODECS",
    "PushReceiver",
    "Pusher",
    "Slot",
    "StallError",
    "TRAILER_BYTES",
    "Tag",
    "WHOLE",
    "chunks",
    "get_chunks",
    "recv_chunks",
    "send_chunks",
    "wait_all",
    "wait_for",
]

log = logging.getLogger("mpips.transport")

HEADER_BYTES = 64
TRAILER_BYTES = 32
PROTOCOL = 2  # 2: streamed pushes (header, chunks last first, tail with mask and trailer)
MAGIC = 0x4D505053  # "MPPS"
TAIL_MAGIC = 0x4D505054  # "MPPT": a streamed push's trailer
STREAMED = 1  # PushHeader flag: the payload follows in chunks and a tail


class Tag(IntEnum):
    PUSH = 11
    PULL_REQUEST = 12
    PULL_REPLY = 13
    PUSH_DATA = 14  # a streamed push's chunks (after its header, which has tag PUSH)
    FINAL = 15  # server -> lead worker at shutdown: the final shard
    CHECKPOINT = 16  # rank -> rank 0: checkpoint pieces, where h5py has no MPI-IO
    NOTICE = 17  # bsp server -> worker: a version is published (NoticeSender / NoticeReceiver)
    PUSH_TAIL = 18  # a streamed push's last message: its mask and PushTrailer
    INIT = 19  # lead worker -> server at registration (job.optimizer): the shard's initial values
    CONTROL = 20  # worker -> server, pickled: ("register", n) from the lead worker, ("finish", w) from each
    DATA_REQUEST = 21  # worker -> data server: sample ids wanted, or done
    DATA = 22  # data server -> worker: the samples


class Codec(IntEnum):
    RAW32 = 0  # float32 values, one per shard element, then one uint8 per tensor run: has a gradient
    # mpips.compression's codecs (their ``wire_id``): one record per chunk of the gradient slice,
    # then the tensor-run mask; the server validates every record before use (parse_payload)
    FP16 = 1
    BF16 = 2
    TOPK = 3
    RANDOMK = 4
    QSGD = 5
    SIGN = 6
    JOIN = 254  # no payload: asp/ssp checkpoint join; step = position, clock_seen = the mark seen
    STOP = 255  # no payload: this worker is done (shutdown is a message)


class Slot(IntEnum):
    """int64 slots of a window's status block."""

    VERSION = 0  # updates applied to this shard
    CLOCK = 1  # steps completed by the slowest worker, as applied here
    APPLIED = 2  # gradients applied
    DROPPED = 3  # gradients dropped (NaN/Inf)
    QUEUE = 4  # pushes that were waiting at the server's last poll
    MAX_STALENESS = 5  # largest staleness of an applied gradient
    CHECKPOINT = 6  # bsp: boundary k that is a checkpoint (-k: then stop, preemption); 0 = none
    REQUEST = 7  # preemption doorbell: a worker that got SIGTERM/SIGUSR1 raises it (raise_flag)


# --pull-codec: the element type of a published shard. Servers keep float32 weights and optimizer
# state; a window exposes a copy in this type, and workers widen what they read back to float32.
PULL_CODECS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = 65504.0


def narrow(out: np.ndarray, values: np.ndarray, codec: str) -> None:
    """Write float32 ``values`` [n] into the bytes ``out`` [n * itemsize] as ``codec`` elements
    (fp16 saturates at +-65504 instead of overflowing to Inf)."""
    src = torch.from_numpy(values)
    if codec == "fp16":
        src = src.clamp(-FP16_MAX, FP16_MAX)
    torch.from_numpy(out).view(PULL_CODECS[codec]).copy_(src)


def widen(out: np.ndarray | torch.Tensor, raw: np.ndarray, codec: str) -> None:
    """Read the ``codec`` elements in the bytes ``raw`` into float32 ``out`` [n] (a tensor on the
    direct path: a message pull's reply lands in host memory, then goes to the device)."""
    dst = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
    dst.copy_(torch.from_numpy(raw).view(PULL_CODECS[codec]))


class MalformedMessage(ValueError):
    """A push failed validation; nothing was applied."""


class StallError(RuntimeError):
    """A wait made no progress within the stall timeout; the message says what it waited for."""


class Backoff:
    """Sleep between polls: starts at ``low`` seconds, doubles up to ``high``. Never spins hot.

    ``Backoff.for_messages()`` caps the sleep at ``MESSAGE_POLL_S``, for waits whose poll is a
    ``Test`` on posted receives (a few microseconds, no lock epoch): a wait then ends at most that
    long after its message came, instead of up to 2 ms (the default cap, for polls that read
    windows under a lock).
    """

    MESSAGE_POLL_S = 250e-6

    def __init__(self, low: float = 20e-6, high: float = 2e-3):
        self.low, self.high, self.delay = low, high, low

    @classmethod
    def for_messages(cls) -> Backoff:
        return cls(low=10e-6, high=cls.MESSAGE_POLL_S)

    def reset(self) -> None:
        self.delay = self.low

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.high, self.delay * 2)


def wait_for(
    ready: Callable[[], bool], what: str | Callable[[], str], timeout: float,
    moved: Callable[[], bool] | None = None, backoff: Backoff | None = None,
) -> None:
    """Poll ``ready()`` with backoff until it is true; StallError after ``timeout`` seconds.

    ``what`` (or what it returns, called at the timeout) names the peers, window or tag waited for.
    ``moved()``, called after each ``ready()`` that is false, says whether something advanced
    (a chunk arrived): then the backoff and the stall clock start over, so a transfer of many
    chunks is polled at the short interval while it flows. ``backoff``: the sleeps between polls
    (default ``Backoff()``).
    """
    backoff, start = backoff if backoff is not None else Backoff(), time.monotonic()
    while not ready():
        if moved is not None and moved():
            backoff.reset()
            start = time.monotonic()
        elif time.monotonic() - start > timeout:
            since = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - start)))
            raise StallError(f"no progress for {timeout:.0f} s while waiting for"
                             f" {what() if callable(what) else what}, since {since}")
        backoff.wait()


# -- chunked transfers: the only MPI calls that move shards ---------------------------------------
def _bytes_of(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A uint8 view (no copy) of a C-contiguous array, or of a contiguous torch tensor (device
    memory on the direct path: mpi4py takes it through DLPack / ``__cuda_array_interface__``)."""
    if isinstance(array, torch.Tensor):
        if not array.is_contiguous():
            raise ValueError("chunked transfers need contiguous buffers")
        return array.reshape(-1).view(torch.uint8)
    if not array.flags.c_contiguous:
        raise ValueError("chunked transfers need C-contiguous buffers")
    return array.reshape(-1).view(np.uint8)


def _nbytes(raw: np.ndarray | torch.Tensor) -> int:
    return raw.numel() if isinstance(raw, torch.Tensor) else raw.size


def send_chunks(
    comm: MPI.Comm, data: np.ndarray, dest: int, tag: int, chunk_bytes: int, *, first_tag: int | None = None,
    synchronous_last: bool = False,
) -> list[MPI.Request]:
    """``Isend`` the bytes of ``data`` to ``dest`` in chunks, in order; one request per chunk.

    ``first_tag``: the tag of the first chunk, where it differs from the others' (a push).
    ``synchronous_last``: send the last chunk with ``Issend``, whose request completes only once
    the receiver has matched it. Chunks at or below the MPI's eager limit (4 KiB on shared
    memory) otherwise complete as soon as they are buffered, and a sender that bounds what it has
    in flight by completed requests would not be bounded at all.
    ``data`` must stay unchanged until every request has completed.
    """
    raw = _bytes_of(data)
    cuts = chunks(_nbytes(raw), chunk_bytes)
    requests = []
    for i, (a, b) in enumerate(cuts):
        send = comm.Issend if synchronous_last and i == len(cuts) - 1 else comm.Isend
        chunk_tag = first_tag if i == 0 and first_tag is not None else tag
        requests.append(send([raw[a:b], MPI.BYTE], dest=dest, tag=chunk_tag))
    return requests


def recv_chunks(comm: MPI.Comm, out: np.ndarray, source: int, tag: int, chunk_bytes: int) -> list[MPI.Request]:
    """``Irecv`` into the bytes of ``out`` from ``source`` in chunks, as ``send_chunks`` cut them."""
    raw = _bytes_of(out)
    return [comm.Irecv([raw[a:b], MPI.BYTE], source=source, tag=tag) for a, b in chunks(_nbytes(raw), chunk_bytes)]


def get_chunks(win: MPI.Win, out: np.ndarray, target: int, disp: int, chunk_bytes: int) -> list[MPI.Request]:
    """``Rget`` bytes ``disp .. disp + out.nbytes`` of ``target``'s window into ``out``, in chunks.

    Call inside a passive-target epoch (a lock on ``target``); the window's disp_unit must be 1.
    Displacements are MPI_Aint, so windows over 2 GiB are fine (measured: Open MPI 4.1).
    """
    raw = _bytes_of(out)
    return [
        win.Rget([raw[a:b], MPI.BYTE], target, (disp + a, b - a, MPI.BYTE))
        for a, b in chunks(_nbytes(raw), chunk_bytes)
    ]


def wait_all(requests: list[MPI.Request], what: str | Callable[[], str], timeout: float = 300.0) -> None:
    """Wait for every request with backoff; StallError naming ``what`` after ``timeout`` seconds
    in which none completed."""
    left, completed = sum(r != MPI.REQUEST_NULL for r in requests), 0

    def ready() -> bool:
        nonlocal left, completed
        done = MPI.Request.Testsome(requests)  # completed ones become REQUEST_NULL
        completed = len(done) if done else 0
        left -= completed
        return done is None or left <= 0

    wait_for(ready, what, timeout, moved=lambda: completed > 0)


@dataclass(frozen=True)
class PushHeader:
    """Metadata in front of every push. All fields are validated by ``decode``.

    ``streamed``: the header travels alone, and the payload follows as chunks and a tail
    (``Pusher.begin``); ``length`` is then the layout's largest payload, and ``grad_norm`` and
    ``loss`` (known only after backward) come in the tail's ``PushTrailer``. ``PushReceiver``
    hands out the header with the trailer's values and the payload's real length filled in.
    """

    step: int  # the worker's global step this gradient belongs to
    worker: int  # worker index (0..W-1)
    codec: int
    samples: int  # samples the gradient averages over (0 for an empty last batch)
    clock_seen: int  # slowest-worker clock of the parameters the gradient was computed on (JOIN: the mark)
    length: int  # payload bytes
    grad_norm: float  # L2 norm of the worker's whole gradient (all servers' slices)
    loss: float
    applied_seen: int = 0  # gradients this server had applied when the worker pulled
    streamed: bool = False

    _FORMAT = struct.Struct("<IHBBqiiqqddq")  # 64 bytes: HEADER_BYTES

    def pack_into(self, buf: np.ndarray) -> None:
        self._FORMAT.pack_into(
            buf, 0, MAGIC, PROTOCOL, self.codec, STREAMED if self.streamed else 0, self.step, self.worker,
            self.samples, self.clock_seen, self.length, self.grad_norm, self.loss, self.applied_seen,
        )

    @classmethod
    def decode(cls, buf: np.ndarray, nbytes: int, *, worker: int, max_payload: int) -> PushHeader:
        """Parse and validate a received first message of ``nbytes`` from worker ``worker``: a
        whole push (header + ``length`` payload bytes) or a streamed push's header (exactly
        ``HEADER_BYTES``, announcing ``0 < length <= max_payload`` bytes to follow)."""
        if nbytes < HEADER_BYTES:
            raise MalformedMessage(f"push from worker {worker}: {nbytes} bytes, shorter than a header")
        magic, proto, codec, flags, step, w, samples, clock, length, norm, loss, applied = \
            cls._FORMAT.unpack_from(buf, 0)
        problems = []
        if magic != MAGIC:
            problems.append(f"bad magic {magic:#x}")
        if proto != PROTOCOL:
            problems.append(f"protocol {proto}, expected {PROTOCOL}")
        if codec not in Codec.__members__.values():
            problems.append(f"unknown codec {codec}")
        if flags not in (0, STREAMED):
            problems.append(f"unknown flags {flags:#x}")
        if w != worker:
            problems.append(f"claims worker {w}")
        if step < 0 or samples < 0 or (clock < -1 and codec != Codec.JOIN) or applied < 0:
            problems.append(f"negative step/samples/clock/applied ({step}/{samples}/{clock}/{applied})")
        streamed = flags == STREAMED
        if streamed and (nbytes != HEADER_BYTES or not 0 < length <= max_payload or codec in (Codec.JOIN, Codec.STOP)):
            problems.append(f"streamed header of {nbytes} bytes announcing {length} payload bytes"
                            f" (max {max_payload}) for codec {codec}")
        elif not streamed and (length != nbytes - HEADER_BYTES or length > max_payload):
            problems.append(f"payload length {length} (received {nbytes - HEADER_BYTES}, max {max_payload})")
        if problems:
            raise MalformedMessage(f"malformed push from worker {worker}: " + "; ".join(problems))
        return cls(step, w, codec, samples, clock, length, norm, loss, applied, streamed)


@dataclass(frozen=True)
class PushTrailer:
    """The end of a streamed push's tail (after the mask): what is known only after backward."""

    worker: int
    step: int  # the header's step, so a tail cannot be taken for another push's
    grad_norm: float
    loss: float

    _FORMAT = struct.Struct("<Iiqdd")  # 32 bytes: TRAILER_BYTES

    def pack_into(self, buf: np.ndarray) -> None:
        self._FORMAT.pack_into(buf, 0, TAIL_MAGIC, self.worker, self.step, self.grad_norm, self.loss)

    @classmethod
    def decode(cls, buf: np.ndarray, header: PushHeader) -> PushTrailer:
        """Parse and validate the trailer of ``header``'s push (``TRAILER_BYTES`` of ``buf``)."""
        magic, w, step, norm, loss = cls._FORMAT.unpack_from(buf, 0)
        problems = []
        if magic != TAIL_MAGIC:
            problems.append(f"bad trailer magic {magic:#x}")
        if w != header.worker or step != header.step:
            problems.append(f"trailer of worker {w}, step {step}")
        if problems:
            raise MalformedMessage(f"malformed push from worker {header.worker} for step {header.step}: "
                                   + "; ".join(problems))
        return cls(w, step, norm, loss)


@dataclass(frozen=True)
class PushLayout:
    """The payload of a push to one server, as both sides know it before anything is sent.

    The gradient slice is cut into chunks (``mpips.compression.chunk_ranges``, the codec's unit
    too); chunk ``c`` has a **slot** of ``slots[c]`` bytes in the payload, in slice order, then
    ``runs`` bytes of tensor-run mask follow. Raw float32: a slot is the chunk's 4 x n bytes,
    filled exactly (``exact``). A codec: a slot is its record's bound (``max_record_bytes``) and
    the record may be shorter; the receiver closes the gaps before handing the payload on.

    A push of ``HEADER_BYTES + max_payload <= chunk_bytes`` is one message (``one_message``);
    any other is streamed: header, chunks last first, tail (see ``Pusher.begin``).
    """

    slots: tuple[int, ...]
    runs: int
    exact: bool = True

    @classmethod
    def raw(cls, numel: int, runs: int, chunk_bytes: int) -> PushLayout:
        """Float32 gradient of ``numel`` elements cut into chunks of ``chunk_bytes // 4`` elements."""
        return cls.of(None, chunks(numel, max(1, chunk_bytes // 4)), runs)

    @classmethod
    def of(cls, codec: Any, ranges: Sequence[tuple[int, int]], runs: int) -> PushLayout:
        """A slice cut into element ``ranges`` (``chunk_ranges``): raw float32 (``codec`` None) or
        one record per chunk of at most ``codec.max_record_bytes(n)`` bytes (a ``ChunkCodec``)."""
        if codec is None:
            return cls(tuple(4 * (b - a) for a, b in ranges), runs, True)
        return cls(tuple(codec.max_record_bytes(b - a) for a, b in ranges), runs, False)

    @property
    def body_bytes(self) -> int:
        return sum(self.slots)

    @property
    def max_payload(self) -> int:
        return self.body_bytes + self.runs

    def offsets(self) -> list[int]:
        """Byte offset of each slot in the payload."""
        out, at = [], 0
        for n in self.slots:
            out.append(at)
            at += n
        return out

    def one_message(self, chunk_bytes: int) -> bool:
        return HEADER_BYTES + self.max_payload <= min(chunk_bytes, MAX_CHUNK_BYTES)


class ParameterWindow:
    """A server's shard, published to workers through two RMA windows (a versioned double buffer).

    A server writes each new version (``params`` and its ``status`` block) into whichever of its
    two exposed buffers holds the older version, under an exclusive lock on that buffer alone
    (see "Server updates" below), then points its doorbell's ``NEWEST`` slot at it.
    Workers read that slot (one atomic read) and then the buffer under a shared lock, status block
    and shard in one epoch, so a pull always sees one whole version, and a server update never waits on the pulls
    of the current version: only on a pull still reading the version before it. (With a single
    locked buffer, workers pulling back to back starved the server's exclusive lock forever:
    measured with Open MPI 4.1 osc/rdma.)

    Each rank also exposes a small doorbell block that peers raise atomically (``raise_flag``)
    and the owner reads (``flag``). Workers expose nothing else. Creation and ``free()`` are
    collective over ``comm``.

    ``pull_codec`` (``--pull-codec``, the same on every rank): the exposed buffers hold the shard
    as float32, bf16 or fp16 elements; ``params`` stays float32, and ``pull`` widens.

    Server updates. With float32 pulls the server keeps no private copy: ``begin_update()`` takes
    the exclusive lock on the stale buffer, copies the current version's shard into it and makes
    ``params`` that buffer's shard, which the optimizer then updates in place; ``publish()``
    writes the status block, unlocks and points ``NEWEST`` there. Readers never wait for it: they
    read the buffer ``NEWEST`` names, which the update does not touch (a pull that read ``NEWEST``
    just before the previous publish and locks late waits for this update, then reads it whole).
    With bf16/fp16 pulls ``params`` is a private float32 master and ``publish()`` narrows it.

    Bucket by bucket (bsp, ``begin_update(lazy=True)``): the server holds a *shared* lock on the
    stale buffer, and ``prepare`` / ``expose`` each bucket in turn, so workers told by a notice
    (``NoticeSender.send_partial``) read finished buckets (``pull_ranges``) while the next ones
    are updated; ``publish()`` then writes the status block as before. Safe only where nobody
    can still be reading the stale buffer's older version, which bsp guarantees.
    """

    NEWEST = 0  # doorbell slot: the exposed buffer that holds the newest version (set by publish)

    def __init__(
        self, comm: MPI.Comm, shard_elements: int, init: np.ndarray | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES, pull_codec: str = "fp32",
    ):
        """``init``: the shard's initial values; a contiguous float32 vector becomes the working copy."""
        self.comm, self.chunk_bytes, self.pull_codec = comm, chunk_bytes, pull_codec
        self.itemsize = PULL_CODECS[pull_codec].itemsize
        self._staging: list[np.ndarray] = []  # worker, low-precision pulls: the bytes read per target
        n = shard_elements
        self.in_place = pull_codec == "fp32"  # the optimizer updates the stale exposed buffer itself
        self._updating: int | None = None  # the exposed buffer an update holds (in place)
        self._lazy = False  # the update in progress is exposed range by range (begin_update(lazy=True))
        # the values, set before the windows exist so no pull can see uninitialised memory: with
        # bf16/fp16 pulls the float32 master is ``init`` itself where it is a float32 vector
        if init is not None and init.dtype == np.float32 and init.flags.c_contiguous and init.size == n:
            self._master = init
        else:
            self._master = np.zeros(n, dtype=np.float32)
            if init is not None:
                self._master[:] = init
        self.status = np.zeros(HEADER_BYTES // 8, dtype=np.int64)  # server's working status
        nbytes = HEADER_BYTES + self.itemsize * n if n else 0
        # Win.Create over our own buffers: passive Get measured ~3x faster than Win.Allocate here.
        self._memory = [np.zeros(max(nbytes, HEADER_BYTES), dtype=np.uint8) for _ in range(2)]
        for i, mem in enumerate(self._memory):
            self._expose(mem[HEADER_BYTES:nbytes])
            mem[:HEADER_BYTES].view(np.int64)[Slot.VERSION] = -i  # buffer 0 is current
        if self.in_place:
            self._master = None  # the exposed buffers hold the values (init is the caller's to drop)
        self._bell_memory = np.zeros(HEADER_BYTES // 8, dtype=np.int64)
        self._wins: list[MPI.Win] | None = []
        self.rma = self._create(nbytes)

    def _create(self, nbytes: int) -> bool:
        """Create the windows; False (on every rank, none created) where the library cannot.

        Seen with Debian's Open MPI: no one-sided component for a TCP-only transport (a
        multi-node Ethernet cluster) or for one rank. Pulls then go by messages.
        """
        error = ""
        try:
            for mem in self._memory:
                self._wins.append(MPI.Win.Create(mem[:nbytes] if nbytes else None, 1, comm=self.comm))
            self._wins.append(MPI.Win.Create(self._bell_memory, 8, comm=self.comm))
        except MPI.Exception as exc:
            error = exc.Get_error_string()
        errors = self.comm.allgather(error)
        if not any(errors):
            return True
        for win in self._wins:
            win.Free()
        self._wins = []
        if self.comm.Get_rank() == 0:  # said once, whichever ranks failed
            failed = [e for e in errors if e]
            log.warning("no RMA windows on this MPI transport (%s, on %d of %d ranks): pulls go by messages",
                        failed[0], len(failed), len(errors))
        return False

    @property
    def wins(self) -> list[MPI.Win]:
        if self._wins is None:
            raise RuntimeError("parameter window used after free()")
        if not self.rma:
            raise RuntimeError("this MPI transport has no RMA windows; use message pulls")
        return self._wins

    def _current(self) -> int:
        v = [int(m[:HEADER_BYTES].view(np.int64)[Slot.VERSION]) for m in self._memory]
        return 0 if v[0] >= v[1] else 1

    def _expose(self, out: np.ndarray) -> None:
        """The master values into the bytes ``out`` of an exposed buffer, in the pull codec's type."""
        if self.pull_codec == "fp32":
            out.view(np.float32)[:] = self._master
        else:
            narrow(out, self._master, self.pull_codec)

    def _expose_range(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Master elements ``lo:hi`` into the exposed bytes ``out`` (the pull codec's type)."""
        narrow(out[self.itemsize * lo : self.itemsize * hi], self._master[lo:hi], self.pull_codec)

    def _shard(self, b: int) -> np.ndarray:
        return self._memory[b][HEADER_BYTES:].view(np.float32)

    @property
    def params(self) -> np.ndarray:
        """Server: float32 [shard elements]: in an update, the values being updated; else the
        current version's (read only: change them inside ``begin_update()`` / ``publish()``)."""
        if not self.in_place:
            return self._master
        if self._updating is not None:
            return self._shard(self._updating)
        current = self._shard(self._current())
        current.flags.writeable = False  # published: readers may be reading it
        return current

    def begin_update(self, lazy: bool = False) -> int | None:
        """Server, before changing ``params``: in place, lock the stale buffer exclusively and
        bring it to the current values; returns its index (None with a private master).

        ``lazy`` (bsp, published bucket by bucket): take a *shared* lock on the stale buffer and
        copy nothing yet. The caller brings each range to the current values (``prepare``)
        before changing it and makes it readable (``expose``) once changed, every range before
        ``publish()``; workers may read the ranges exposed so far while later ones change. Only
        safe where no reader can still be reading the stale buffer's older version: in bsp every
        worker has pulled the current version before its push, and the update waits for every push.
        """
        if self._updating is not None:
            return self._updating if self.in_place else None
        if not self.in_place and not lazy:
            return None
        stale = 1 - self._current()
        if self.rma:
            self.wins[stale].Lock(self.comm.Get_rank(), MPI.LOCK_SHARED if lazy else MPI.LOCK_EXCLUSIVE)
        if self.in_place and not lazy:
            self._shard(stale)[:] = self._shard(1 - stale)
        self._updating, self._lazy = stale, lazy
        return stale if self.in_place else None

    @property
    def updating(self) -> int | None:
        """The exposed buffer an update in progress writes (0 or 1), or None."""
        return self._updating

    def next_version(self) -> int:
        """The version the next ``publish()`` makes."""
        return int(self._memory[self._current()][:HEADER_BYTES].view(np.int64)[Slot.VERSION]) + 1

    def prepare(self, lo: int, hi: int) -> None:
        """Lazy update: bring elements ``lo:hi`` of the buffer being updated to the current values."""
        if self.in_place and self._lazy:
            self._shard(self._updating)[lo:hi] = self._shard(1 - self._updating)[lo:hi]

    def expose(self, lo: int, hi: int) -> None:
        """Lazy update: elements ``lo:hi`` are final; make them readable (narrowed with a
        bf16/fp16 pull codec, then ``MPI_Win_sync``) before telling any worker."""
        if not self._lazy:
            raise RuntimeError("expose() belongs to an update begun with begin_update(lazy=True)")
        if not self.in_place:
            self._expose_range(self._memory[self._updating][HEADER_BYTES:], lo, hi)
        if self.rma:
            self.wins[self._updating].Sync()

    def published(self) -> np.ndarray:
        """Server: the bytes of the current version (status block + shard)."""
        return self._memory[self._current()]

    def publish(self) -> int:
        """Server: make ``params`` and ``status`` the next version, atomically for readers.

        Returns the index (0 or 1) of the exposed buffer that now holds it.
        """
        me, cur = self.comm.Get_rank(), self._current()
        stale = 1 - cur
        mem = self._memory[stale]
        self.status[Slot.VERSION] = self.next_version()
        if self._updating is None:  # a publish without new values: the current ones, as the next version
            if self.in_place:
                self.begin_update()
            elif self.rma:
                self.wins[stale].Lock(me, MPI.LOCK_EXCLUSIVE)
        try:
            if not self.in_place and not self._lazy:  # a lazy update exposed every range itself
                self._expose(mem[HEADER_BYTES:])
            mem[:HEADER_BYTES].view(np.int64)[:] = self.status
        finally:
            self._updating, self._lazy = None, False
            if self.rma:
                self.wins[stale].Unlock(me)
        if self.rma:  # readers go there from now on
            self._bell_accumulate(me, self.NEWEST, stale, MPI.REPLACE)
        return stale

    def _lock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Lock(t, MPI.LOCK_SHARED)

    def _unlock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Unlock(t)

    def newest(self, targets: list[int]) -> list[int]:
        """Worker: which exposed buffer of each target holds its newest version (its doorbell's
        ``NEWEST`` slot, read atomically in one shared epoch per target)."""
        return [self._bell_read(t, self.NEWEST) for t in targets]

    def read_status(self, targets: list[int], out: np.ndarray) -> list[int]:
        """Worker: the status block of each target's newest version into ``out[i]``; returns the
        buffer indices (``newest``). A server rewrites a buffer only with the version after the
        other buffer's, so the block read is of that version or a newer one, whole."""
        which = self.newest(targets)
        self._lock_all(targets, which)
        reqs = [r for i, (t, b) in enumerate(zip(targets, which, strict=True))
                for r in get_chunks(self.wins[b], out[i], t, 0, self.chunk_bytes)]
        MPI.Request.Waitall(reqs)
        self._unlock_all(targets, which)
        return which

    def pull(
        self, targets: list[int], status: np.ndarray, shards: list[np.ndarray], which: list[int] | None = None
    ) -> None:
        """Worker: status block and shard of the newest version of every target, whole.

        ``which``: the buffer indices a ``read_status`` just returned, to skip reading them again.
        That buffer is then at least as new as the status read: a server only rewrites a buffer
        with the version after the other buffer's, and whatever is read under the lock is whole.
        """
        if which is None:
            which = self.newest(targets)
        wide = self.pull_codec == "fp32"
        if not wide and not self._staging:
            self._staging = [np.empty(self.itemsize * s.size, dtype=np.uint8) for s in shards]
        self._lock_all(targets, which)
        reqs = []
        for i, (t, b) in enumerate(zip(targets, which, strict=True)):
            reqs += get_chunks(self.wins[b], status[i], t, 0, self.chunk_bytes)
            reqs += get_chunks(self.wins[b], shards[i] if wide else self._staging[i], t, HEADER_BYTES,
                               self.chunk_bytes)
        MPI.Request.Waitall(reqs)
        self._unlock_all(targets, which)
        if not wide:
            for shard, raw in zip(shards, self._staging, strict=True):
                widen(shard, raw, self.pull_codec)

    def pull_ranges(
        self, target: int, buffer: int, ranges: list[tuple[int, int]], shard: np.ndarray,
        status: np.ndarray | None = None,
    ) -> None:
        """Worker: elements ``lo:hi`` of each range of ``target``'s exposed buffer ``buffer`` into
        ``shard[lo:hi]`` (widened from the pull codec), and its status block into ``status``
        if given, in one shared-lock epoch (``mpips.client.pullahead``: the buckets a notice says are
        exposed)."""
        size, wide = self.itemsize, self.pull_codec == "fp32"
        win = self.wins[buffer]
        raw = [shard[lo:hi] if wide else np.empty(size * (hi - lo), dtype=np.uint8) for lo, hi in ranges]
        win.Lock(target, MPI.LOCK_SHARED)
        reqs = get_chunks(win, status, target, 0, self.chunk_bytes) if status is not None else []
        for (lo, _), out in zip(ranges, raw, strict=True):
            reqs += get_chunks(win, out, target, HEADER_BYTES + size * lo, self.chunk_bytes)
        MPI.Request.Waitall(reqs)
        win.Unlock(target)
        if not wide:
            for (lo, hi), out in zip(ranges, raw, strict=True):
                widen(shard[lo:hi], out, self.pull_codec)

    def raise_flag(self, target: int, slot: int, value: int) -> None:
        """Atomically raise doorbell ``slot`` of ``target`` to at least ``value`` (MPI_MAX).

        Without RMA windows there is no doorbell: a no-op (Slurm signals every rank anyway).
        """
        if self.rma:
            self._bell_accumulate(target, slot, value, MPI.MAX)

    def flag(self, slot: int) -> int:
        """This rank's doorbell ``slot``, read atomically (0 without RMA windows)."""
        return self._bell_read(self.comm.Get_rank(), slot) if self.rma else 0

    def _bell_accumulate(self, target: int, slot: int, value: int, op: MPI.Op) -> None:
        """``op`` (MAX, REPLACE) ``value`` into doorbell ``slot`` of ``target``, atomically."""
        win = self.wins[2]
        win.Lock(target, MPI.LOCK_SHARED)
        # origin and target must name the same datatype: numpy's int64 maps to MPI_LONG (ERR_ARG)
        win.Accumulate([np.array([value], dtype=np.int64), MPI.INT64_T], target, (slot, 1, MPI.INT64_T), op=op)
        win.Unlock(target)

    def _bell_read(self, target: int, slot: int) -> int:
        """Doorbell ``slot`` of ``target``, read atomically in one shared epoch."""
        win, out = self.wins[2], np.zeros(1, dtype=np.int64)
        win.Lock(target, MPI.LOCK_SHARED)
        win.Get_accumulate(np.zeros(1, dtype=np.int64), out, target, (slot, 1, MPI.INT64_T), op=MPI.NO_OP)
        win.Unlock(target)
        return int(out[0])

    def free(self) -> None:
        """Collective; idempotent."""
        if self._wins is not None:
            for win in self._wins:
                win.Free()
            self._wins = None


@dataclass
class _Outgoing:
    """A streamed push being sent: header out, chunks going out last first, tail to come."""

    buf: np.ndarray | torch.Tensor
    header: PushHeader
    requests: list[MPI.Request]
    next: int  # the chunk to send next (chunks go last first); -1: all sent
    nbytes: int  # bytes sent so far


class Pusher:
    """Worker side: nonblocking pushes to servers, at most ``max_inflight`` outstanding per server.

    A push whose layout fits one chunk is one message, sent whole (``push``). Any other is
    streamed: ``begin`` sends its header (the fields known before backward), ``send_chunk``
    each chunk of the gradient slice as soon as it is final, last first, and ``end`` the tail
    (mask and ``PushTrailer``: norm and loss) with ``Issend``, so a push counts as in flight
    until the server has taken all of it in. ``push`` sends a streamed push all at once too,
    in the same messages. Every chunk is copied into the push's send buffer before it is sent,
    so the gradient may change as soon as ``end`` returns.

    ``device`` (the direct path, a CUDA-aware MPI): the send buffers are uint8 tensors on that
    device, payload tensors are copied into them on the device, and the copying stream is
    synchronised before the MPI call (MPI does not order itself after CUDA streams).
    """

    def __init__(
        self, comm: MPI.Comm, servers: list[int], layouts: list[PushLayout], max_inflight: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES, device: torch.device | None = None,
    ):
        """``layouts[s]``: what a push to server index ``s`` carries (``PushLayout``)."""
        if chunk_bytes < HEADER_BYTES:
            raise ValueError(f"chunk_bytes {chunk_bytes}: a push's first chunk must hold its header ({HEADER_BYTES})")
        self.comm, self.servers, self.chunk_bytes = comm, servers, min(chunk_bytes, MAX_CHUNK_BYTES)
        self.layouts = list(layouts)
        self.streamed = [not lay.one_message(self.chunk_bytes) for lay in self.layouts]
        self.offsets = [lay.offsets() for lay in self.layouts]

        def buffer(nbytes: int) -> np.ndarray | torch.Tensor:
            if device is None:
                return np.empty(nbytes, dtype=np.uint8)
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

        self.buffers = [[buffer(HEADER_BYTES + lay.max_payload + (TRAILER_BYTES if st else 0))
                         for _ in range(max_inflight)] for lay, st in zip(self.layouts, self.streamed, strict=True)]
        self._head = np.empty(HEADER_BYTES, dtype=np.uint8)  # a device buffer's header, packed on the host
        # per server, the pushes in flight: (one request per message, bytes)
        self.pending: list[deque[tuple[list[MPI.Request], int]]] = [deque() for _ in servers]
        self.open: list[_Outgoing | None] = [None] * len(servers)  # streamed pushes being sent
        self.next_slot = [0] * len(servers)
        self.bytes_sent = 0

    def _wait(self, s: int, requests: list[MPI.Request]) -> None:
        wait_all(requests, f"a push to server index {s} (rank {self.servers[s]}) to be received")

    def _free_slot(self, s: int) -> np.ndarray | torch.Tensor:
        queue = self.pending[s]
        if len(queue) == len(self.buffers[s]):
            self._wait(s, queue.popleft()[0])
        slot = self.next_slot[s]
        self.next_slot[s] = (slot + 1) % len(self.buffers[s])
        return self.buffers[s][slot]

    @staticmethod
    def _put(buf: np.ndarray | torch.Tensor, at: int, part: np.ndarray | torch.Tensor) -> int:
        """Copy the bytes of ``part`` into ``buf`` at byte ``at``; returns how many."""
        raw = _bytes_of(part)
        n = _nbytes(raw)
        if isinstance(buf, torch.Tensor):
            buf[at : at + n].copy_(raw if isinstance(raw, torch.Tensor) else torch.from_numpy(raw))
        else:
            buf[at : at + n] = raw.numpy() if isinstance(raw, torch.Tensor) else raw
        return n

    @staticmethod
    def _synchronize(buf: np.ndarray | torch.Tensor) -> None:
        if isinstance(buf, torch.Tensor) and buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()

    def _pack_header(self, buf: np.ndarray | torch.Tensor, header: PushHeader) -> np.ndarray:
        """Pack ``header`` into ``buf``; returns the host bytes it was packed into (fault hooks)."""
        head = self._head if isinstance(buf, torch.Tensor) else buf
        header.pack_into(head)
        return head[:HEADER_BYTES]

    def push(self, s: int, header: PushHeader, *payload: np.ndarray | torch.Tensor) -> None:
        """Send ``header`` and ``payload`` to server index ``s``, whole (after backward).

        ``payload``: arrays or tensors whose bytes, concatenated, are the payload: for a push that
        is streamed (its layout does not fit one chunk), the body, then the mask as the last part;
        a codec's body as one record per chunk, a raw body in parts cut anywhere.
        """
        if header.length == 0 or not self.streamed[s]:
            self._push_one(s, header, payload)
            return
        *body, mask = payload
        layout, offsets = self.layouts[s], self.offsets[s]
        self.begin(s, header)
        if layout.exact:  # raw: the body's bytes cut at the slots
            parts = [_bytes_of(p) for p in body]
            raw = parts[0] if len(parts) == 1 else (
                torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts))
            records = [raw[a : a + n] for a, n in zip(offsets, layout.slots, strict=True)]
        elif len(body) != len(layout.slots):
            raise ValueError(f"{len(body)} records for {len(layout.slots)} chunks")
        else:
            records = body
        for c in reversed(range(len(records))):
            self.send_chunk(s, c, records[c])
        self.end(s, mask, header.grad_norm, header.loss)

    def _push_one(self, s: int, header: PushHeader, payload: tuple[np.ndarray | torch.Tensor, ...]) -> None:
        buf = self._free_slot(s)
        head = self._pack_header(buf, header)
        n, at = HEADER_BYTES + header.length, HEADER_BYTES
        if isinstance(buf, torch.Tensor):
            buf[:HEADER_BYTES].copy_(torch.from_numpy(head))
        for part in payload:
            at += self._put(buf, at, part)
        if at != n:
            raise ValueError(f"push header says {header.length} payload bytes, got {at - HEADER_BYTES}")
        faults.at("push", header.step, header=head, payload=buf[HEADER_BYTES:n] if header.length else None)
        if isinstance(buf, torch.Tensor):
            buf[:HEADER_BYTES].copy_(torch.from_numpy(head))  # a fault may have changed it
        self._synchronize(buf)
        # synchronous: a push counts as in flight until the server has taken it in
        request = self.comm.Issend([buf[:n], MPI.BYTE], dest=self.servers[s], tag=Tag.PUSH)
        self.pending[s].append(([request], n))
        self.bytes_sent += n

    def begin(self, s: int, header: PushHeader) -> None:
        """Begin a streamed push to server index ``s``: send its header now (before backward).

        ``header.length``, ``grad_norm`` and ``loss`` are ignored: the header announces the
        layout's largest payload, and norm and loss go in the tail (``end``).
        """
        if not self.streamed[s]:
            raise ValueError(f"pushes to server index {s} fit one chunk: send them whole with push()")
        if self.open[s] is not None:
            raise RuntimeError(f"a streamed push to server index {s} is still open")
        buf = self._free_slot(s)
        header = dataclasses.replace(header, length=self.layouts[s].max_payload, grad_norm=0.0, loss=0.0,
                                     streamed=True)
        head = self._pack_header(buf, header)
        faults.at("push", header.step, header=head)
        if isinstance(buf, torch.Tensor):
            buf[:HEADER_BYTES].copy_(torch.from_numpy(head))
            self._synchronize(buf)
        request = self.comm.Isend([buf[:HEADER_BYTES], MPI.BYTE], dest=self.servers[s], tag=Tag.PUSH)
        self.open[s] = _Outgoing(buf, header, [request], len(self.layouts[s].slots) - 1, HEADER_BYTES)

    def send_chunk(self, s: int, c: int, data: np.ndarray | torch.Tensor) -> None:
        """Send chunk ``c`` of the open push to server index ``s``: raw, the chunk's float32
        values; a codec, its record (at most the slot's bytes). Chunks go last first, each once:
        ``c`` must be the highest not yet sent (the receiver posts its receives in that order)."""
        out, layout = self.open[s], self.layouts[s]
        if out is None or c != out.next:
            raise ValueError(f"chunk {c} of a push to server index {s} out of order (chunks go last first;"
                             f" expected {None if out is None else out.next})")
        slot, at = layout.slots[c], HEADER_BYTES + self.offsets[s][c]
        n = self._put(out.buf, at, data)
        if n > slot or (layout.exact and n != slot):
            raise ValueError(f"chunk {c} of {n} bytes for a slot of {slot}")
        if c == 0:  # the first payload bytes (sent last)
            faults.at("push", out.header.step, payload=out.buf[at : at + n])
        self._synchronize(out.buf)
        for a, b in chunks(slot, self.chunk_bytes):  # one message, unless a record outgrows a chunk
            hi = max(a, min(b, n))  # the last messages of a short record are short, or empty
            out.requests.append(self.comm.Isend([out.buf[at + a : at + hi], MPI.BYTE], dest=self.servers[s],
                                                tag=Tag.PUSH_DATA))
        out.nbytes += n
        out.next -= 1

    def end(self, s: int, mask: np.ndarray, grad_norm: float, loss: float) -> None:
        """Finish the open push to server index ``s``: every chunk is sent; send the tail (the
        mask, uint8 [runs], and the trailer), its last message synchronous."""
        out, layout = self.open[s], self.layouts[s]
        if out is None or out.next != -1:
            raise ValueError(f"the push to server index {s} is not open or has chunks left to send")
        tail = np.empty(layout.runs + TRAILER_BYTES, dtype=np.uint8)
        tail[: layout.runs] = mask
        PushTrailer(out.header.worker, out.header.step, grad_norm, loss).pack_into(tail[layout.runs :])
        at = HEADER_BYTES + layout.body_bytes
        self._put(out.buf, at, tail)
        self._synchronize(out.buf)
        out.requests += send_chunks(self.comm, out.buf[at : at + tail.size], self.servers[s], Tag.PUSH_TAIL,
                                    self.chunk_bytes, synchronous_last=True)
        out.nbytes += tail.size
        self.pending[s].append((out.requests, out.nbytes))
        self.bytes_sent += out.nbytes
        self.open[s] = None

    def drain(self) -> None:
        if any(out is not None for out in self.open):
            raise RuntimeError("a streamed push is still open")
        for s, queue in enumerate(self.pending):
            while queue:
                self._wait(s, queue.popleft()[0])


@dataclass
class _Incoming:
    """A streamed push whose header is in; its chunks and tail are being received."""

    header: PushHeader
    requests: list[MPI.Request]  # one per message, in sending order: chunks last first, then the tail
    slot: list[int]  # the chunk each message belongs to; -1: the tail
    sizes: list[int]  # each message's receive buffer, bytes
    got: list[int]  # bytes each message brought
    left: int  # messages still to come


class PushReceiver:
    """Server side: each worker's next first message is received ahead; ``poll`` returns the
    pushes that are complete.

    Memory is bounded by chunks, not by workers x shard: one first-message buffer per worker (at
    most ``chunk_bytes``) and one **body** buffer, as large as the layout's payload and a trailer,
    that one streamed push at a time is received into. A one-message push is complete when it
    arrives. A streamed push's header is validated when it arrives; the push then waits until
    the body is free, and its chunks (last first, as sent) and tail are received there, all
    posted at once (MPI keeps them in order), each checked for its size; meanwhile its sender's
    chunks stay with the sender (above the eager limit) or in MPI's queue. Nothing of it is
    handed out before the tail: the trailer is validated, a codec's records are moved together
    (where one is shorter than its slot), and the mask follows them, so the payload reads as a
    one-message push's would. ``prefer``: the only worker whose push may take the body next
    (bsp sums in worker order, so a later worker's push must not hold the body the next one
    needs); None: the first to arrive.
    """

    def __init__(self, comm: MPI.Comm, workers: list[int], layout: PushLayout,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes < HEADER_BYTES:
            raise ValueError(f"chunk_bytes {chunk_bytes}: a push's first chunk must hold its header ({HEADER_BYTES})")
        self.comm, self.workers, self.layout = comm, workers, layout
        self.chunk_bytes = min(chunk_bytes, MAX_CHUNK_BYTES)
        self.max_payload = layout.max_payload
        self.streamed = not layout.one_message(self.chunk_bytes)
        self.offsets = layout.offsets()
        self.first = min(self.chunk_bytes, HEADER_BYTES + self.max_payload)  # bytes of a push's first message
        self.firsts = [np.empty(self.first, dtype=np.uint8) for _ in workers]
        self.body = np.empty(self.max_payload + TRAILER_BYTES, dtype=np.uint8) if self.streamed else None
        self.requests = [MPI.REQUEST_NULL] * len(workers)  # first messages
        self.waiting: dict[int, PushHeader] = {}  # streamed header in, body not yet
        self.owner: int | None = None  # the worker whose push is in (or coming into) the body
        self.receiving: _Incoming | None = None  # the rest of the owner's push, while it comes
        self.prefer: int | None = None
        self.progressed = False  # the last poll saw a message arrive
        self.bytes_received = 0
        for w in range(len(workers)):
            self.repost(w)

    def repost(self, w: int) -> None:
        """Worker ``w``'s push is consumed: free its buffer (the body, if it held it), receive its next."""
        if self.owner == w:
            self.owner = None
        self.requests[w] = self.comm.Irecv([self.firsts[w], MPI.BYTE], source=self.workers[w], tag=Tag.PUSH)

    def poll(self) -> list[tuple[int, PushHeader, np.ndarray]]:
        """Completed pushes as (worker index, validated header, payload bytes view).

        The caller must ``repost(w)`` once it has consumed the payload of worker ``w``.
        ``progressed`` tells whether any message arrived (poll again soon).

        Raises:
            MalformedMessage: naming the worker, for a push that fails validation.
        """
        statuses: list[MPI.Status] = []
        done = MPI.Request.Testsome(self.requests, statuses)
        self.progressed = bool(done)
        out = []
        for w, st in zip(done or [], statuses, strict=True):
            nbytes = st.Get_count(MPI.BYTE)
            header = PushHeader.decode(self.firsts[w], nbytes, worker=w, max_payload=self.max_payload)
            if header.streamed != (self.streamed and header.length > 0) or (
                    header.streamed and header.length != self.max_payload):
                want = (f"streamed (a header announcing {self.max_payload} bytes, chunks, a tail)" if self.streamed
                        else f"one message of at most {self.first} bytes")
                raise MalformedMessage(
                    f"malformed push from worker {w}: {'a streamed header announcing' if header.streamed else 'one'}"
                    f" {header.length} payload bytes; pushes here are {want} (a different --chunk-bytes?)"
                )
            if header.streamed:
                self.waiting[w] = header
            else:
                self.bytes_received += nbytes
                out.append((w, header, self.firsts[w][HEADER_BYTES:nbytes]))
        if self.owner is None and self.waiting:
            w = self.prefer if self.prefer is not None else next(iter(self.waiting))
            if w in self.waiting:
                self.owner = w
                self.receiving = self._post(w, self.waiting.pop(w))
        if self.receiving is not None:
            done = self._progress(self.receiving)
            if done is not None:
                out.append(done)
        return out

    def _post(self, w: int, header: PushHeader) -> _Incoming:
        """Post the receives of the rest of worker ``w``'s push, in the order it sends it."""
        source, layout, cut = self.workers[w], self.layout, self.chunk_bytes
        requests, slot, sizes = [], [], []
        for c in reversed(range(len(layout.slots))):
            at = self.offsets[c]
            for a, b in chunks(layout.slots[c], cut):
                requests.append(self.comm.Irecv([self.body[at + a : at + b], MPI.BYTE], source=source,
                                                tag=Tag.PUSH_DATA))
                slot.append(c)
                sizes.append(b - a)
        at = layout.body_bytes
        for a, b in chunks(layout.runs + TRAILER_BYTES, cut):
            requests.append(self.comm.Irecv([self.body[at + a : at + b], MPI.BYTE], source=source,
                                            tag=Tag.PUSH_TAIL))
            slot.append(-1)
            sizes.append(b - a)
        return _Incoming(header, requests, slot, sizes, [0] * len(requests), len(requests))

    def _progress(self, incoming: _Incoming) -> tuple[int, PushHeader, np.ndarray] | None:
        """Take the messages of the push in the body that have come; the push once all have."""
        statuses: list[MPI.Status] = []
        done = MPI.Request.Testsome(incoming.requests, statuses)
        header, w = incoming.header, self.owner
        for i, st in zip(done or [], statuses, strict=True):
            n, c = st.Get_count(MPI.BYTE), incoming.slot[i]
            if n != incoming.sizes[i] and (c < 0 or self.layout.exact):
                what = "its tail" if c < 0 else f"chunk {c}"
                raise MalformedMessage(
                    f"malformed push from worker {w}: {what} of its push for step {header.step} has {n} bytes,"
                    f" expected {incoming.sizes[i]} (a different --chunk-bytes?)"
                )
            incoming.got[i] = n
        incoming.left -= len(done or [])
        self.progressed |= bool(done)
        if incoming.left:
            return None
        self.receiving = None
        layout, body = self.layout, self.body
        tail = layout.body_bytes
        trailer = PushTrailer.decode(body[tail + layout.runs : tail + layout.runs + TRAILER_BYTES], header)
        length = layout.body_bytes if layout.exact else self._close_gaps(incoming)
        if length != tail:
            body[length : length + layout.runs] = body[tail : tail + layout.runs]
        self.bytes_received += HEADER_BYTES + length + layout.runs + TRAILER_BYTES
        header = dataclasses.replace(header, length=length + layout.runs, grad_norm=trailer.grad_norm,
                                     loss=trailer.loss)
        return w, header, body[: length + layout.runs]

    def _close_gaps(self, incoming: _Incoming) -> int:
        """A codec's records, each received at the start of its slot, moved together in slot
        order; returns their bytes. A record's messages must be full up to its last byte."""
        got: dict[int, list[tuple[int, int]]] = {}
        for c, n, size in zip(incoming.slot, incoming.got, incoming.sizes, strict=True):
            if c >= 0:
                got.setdefault(c, []).append((n, size))
        at = 0
        for c, start in enumerate(self.offsets):
            pieces, n, short = got[c], 0, False
            for k, size in pieces:
                if short and k:
                    raise MalformedMessage(
                        f"malformed push from worker {self.owner}: chunk {c} of its push for step"
                        f" {incoming.header.step} has a gap (a message of {k} bytes after a short one)"
                    )
                short |= k < size
                n += k
            if at != start:
                self.body[at : at + n] = self.body[start : start + n]  # numpy copies overlaps safely
            at += n
        return at

    def describe(self) -> str:
        """What the push in the body still waits for (stall messages), or ''."""
        incoming = self.receiving
        if incoming is None:
            return ""
        chunks_left = sum(1 for i, r in enumerate(incoming.requests) if r != MPI.REQUEST_NULL and incoming.slot[i] >= 0)
        return (f"worker {self.owner}'s push for step {incoming.header.step}: {chunks_left} chunk messages"
                f" and {'its tail' if incoming.requests[-1] != MPI.REQUEST_NULL else 'no tail'} still to come")

    def cancel(self) -> None:
        pending = [*self.requests, *(self.receiving.requests if self.receiving is not None else [])]
        for req in pending:
            if req != MPI.REQUEST_NULL:
                req.Cancel()
                req.Wait()
        self.receiving = None
        self.waiting.clear()


class PullServer:
    """Server side of message-based pulls, for MPI libraries without passive-target progress.

    A worker sends the clock it needs; the reply (status block + shard, in chunks) goes out once
    this server's clock reaches it. Replies are sent from the published buffer, so the server
    must call ``flush()`` before it publishes again.
    """

    def __init__(self, comm: MPI.Comm, window: ParameterWindow, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.comm, self.window, self.chunk_bytes = comm, window, chunk_bytes
        self.request_buf = np.zeros(1, dtype=np.int64)
        self.request = comm.Irecv(self.request_buf, source=MPI.ANY_SOURCE, tag=Tag.PULL_REQUEST)
        self.waiting: list[tuple[int, int]] = []  # (source rank, needed clock)
        self.sending: list[MPI.Request] = []

    def poll(self) -> bool:
        """Take new requests and answer those whose clock is reached; True if anything moved."""
        moved, status = False, MPI.Status()
        while self.request.Test(status):
            self.waiting.append((status.Get_source(), int(self.request_buf[0])))
            self.request = self.comm.Irecv(self.request_buf, source=MPI.ANY_SOURCE, tag=Tag.PULL_REQUEST)
            moved = True
        current = self.window.published()
        status = current[:HEADER_BYTES].view(np.int64)
        clock, mark = int(status[Slot.CLOCK]), int(status[Slot.CHECKPOINT])
        if self.sending:  # replies in flight: a chunk that completed is progress (poll again soon)
            moved |= bool(MPI.Request.Testsome(self.sending))
            self.sending = [r for r in self.sending if r != MPI.REQUEST_NULL]
        still = []
        for source, need in self.waiting:
            if clock >= need or mark:  # a checkpoint mark: the waiting worker must see it and join
                self.sending += send_chunks(self.comm, current, source, Tag.PULL_REPLY, self.chunk_bytes)
                moved = True
            else:
                still.append((source, need))
        self.waiting = still
        return moved

    def flush(self) -> None:
        wait_all(self.sending, "a pull reply to be received")
        self.sending.clear()

    def close(self) -> None:
        self.flush()
        self.request.Cancel()
        self.request.Wait()


class MessagePuller:
    """Worker side of message-based pulls (see PullServer)."""

    def __init__(
        self, comm: MPI.Comm, servers: list[int], shard_sizes: list[int], stall_timeout: float,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES, pull_codec: str = "fp32",
    ):
        """``pull_codec``: the element type the servers publish (``--pull-codec``); pulls widen it."""
        self.comm, self.servers, self.timeout, self.chunk_bytes = comm, servers, stall_timeout, chunk_bytes
        self.pull_codec = pull_codec
        itemsize = PULL_CODECS[pull_codec].itemsize
        self.buffers = [np.empty(HEADER_BYTES + itemsize * n, dtype=np.uint8) for n in shard_sizes]
        self.need = np.zeros(1, dtype=np.int64)

    def pull(self, need: int, status: np.ndarray, shards: list[np.ndarray]) -> None:
        self.need[0] = need
        replies = [
            recv_chunks(self.comm, b, s, Tag.PULL_REPLY, self.chunk_bytes)
            for b, s in zip(self.buffers, self.servers, strict=True)
        ]
        sends = [self.comm.Isend(self.need, dest=s, tag=Tag.PULL_REQUEST) for s in self.servers]
        every = [r for rs in replies for r in rs] + sends
        wait_for(lambda: MPI.Request.Testall(every), lambda: self._lagging(need, replies, status), self.timeout)
        for i, b in enumerate(self.buffers):
            status[i] = b[:HEADER_BYTES].view(np.int64)
            widen(shards[i], b[HEADER_BYTES:], self.pull_codec)

    def _lagging(self, need: int, replies: list[list[MPI.Request]], status: np.ndarray) -> str:
        """Which servers have not replied, for the stall message (as the window path names them)."""
        late = [(s, rank) for s, (reqs, rank) in enumerate(zip(replies, self.servers, strict=True))
                if not all(req.Get_status() for req in reqs)]
        return (f"the servers to reach clock {need} (pull replies; clocks as of the last pull): "
                + ", ".join(f"server {s} (rank {rank} of the parameter-server communicator)"
                            f" at clock {int(status[s, Slot.CLOCK])}" for s, rank in late))


# -- bsp: "your step is applied" as a message --------------------------------------------------
NOTICE_WORDS = 5  # int64: clock, exposed buffer index, version, buckets exposed, checkpoint mark
WHOLE = 1 << 62  # "buckets exposed" of a published version: all of them, and its status block


class NoticeSender:
    """bsp server: tell every worker what is readable, as messages.

    After each publish: the clock, the exposed buffer that holds the version and its number
    (``send``). While a version is being applied bucket by bucket (``ParameterWindow``'s lazy
    update), after each bucket: how many of its buckets are exposed so far (``send_partial``), so
    a worker can pull them while the server applies the rest (``mpips.client.pullahead``). Every
    notice carries the checkpoint mark of the version (``Slot.CHECKPOINT``). A waiting worker
    learns what it waits for from a message it polls cheaply (``Backoff.for_messages``) instead
    of reading every server's status blocks under locks. ``close(w)`` sends worker ``w`` the
    last notice (clock -1) once it has stopped, so it can receive every notice before it frees
    its receive; ``finish()`` waits for every notice to be received.
    """

    def __init__(self, comm: MPI.Comm, workers: list[int]):
        self.comm, self.workers = comm, workers
        self.sending: deque[tuple[np.ndarray, MPI.Request]] = deque()  # buffers stay alive until sent
        self.closed: set[int] = set()

    def _send(self, w: int, words: tuple[int, ...]) -> None:
        while self.sending and self.sending[0][1].Test():
            self.sending.popleft()
        buf = np.array(words, dtype=np.int64)
        self.sending.append((buf, self.comm.Isend(buf, dest=self.workers[w], tag=Tag.NOTICE)))

    def send(self, clock: int, buffer: int, version: int, mark: int = 0) -> None:
        """Version ``version`` (clock ``clock``) is published whole in exposed buffer ``buffer``."""
        self.send_partial(clock, buffer, version, WHOLE, mark)

    def send_partial(self, clock: int, buffer: int, version: int, exposed: int, mark: int = 0) -> None:
        """The first ``exposed`` buckets of version ``version`` are readable in ``buffer``."""
        for w in range(len(self.workers)):
            if w not in self.closed:
                self._send(w, (clock, buffer, version, exposed, mark))

    def close(self, w: int) -> None:
        self._send(w, (-1, 0, 0, 0, 0))
        self.closed.add(w)

    def finish(self, timeout: float) -> None:
        wait_all([r for _, r in self.sending], "every worker to receive its last notice", timeout)
        self.sending.clear()


class NoticeReceiver:
    """bsp worker: the latest notices of every server (see ``NoticeSender``).

    Per server: ``clock``, ``buffer`` and ``version`` of the newest version published whole;
    ``next_clock``, ``next_buffer`` and ``exposed`` (buckets readable) of the
    version being applied after it, if any (``exposed`` 0: none); ``mark``, the checkpoint mark
    of the newest notice.
    """

    def __init__(self, comm: MPI.Comm, servers: list[int]):
        self.comm, self.servers = comm, servers
        n = len(servers)
        # at first what every window holds from its creation (ParameterWindow: buffer 0, version
        # 0, clock 0), so step 0 need not wait for a server's start-up
        self.clock = np.zeros(n, dtype=np.int64)
        self.buffer = [0] * n
        self.version = np.zeros(n, dtype=np.int64)
        self.next_clock = np.full(n, -1, dtype=np.int64)
        self.next_buffer = [0] * n
        self.exposed = np.zeros(n, dtype=np.int64)
        self.mark = np.zeros(n, dtype=np.int64)
        self.ended = [False] * n
        self._bufs = [np.zeros(NOTICE_WORDS, dtype=np.int64) for _ in servers]
        self._reqs = [self.comm.Irecv(b, source=s, tag=Tag.NOTICE) for b, s in zip(self._bufs, servers, strict=True)]

    def poll(self) -> bool:
        """Take every notice that has come; True if any did."""
        moved = False
        for i, req in enumerate(self._reqs):
            while req != MPI.REQUEST_NULL and req.Test():
                moved = True
                clock, buffer, version, exposed, mark = (int(x) for x in self._bufs[i])
                if clock < 0:
                    self.ended[i] = True
                    self._reqs[i] = req = MPI.REQUEST_NULL
                    continue
                if exposed == WHOLE and version > self.version[i]:
                    self.clock[i], self.buffer[i], self.version[i] = clock, buffer, version
                    self.exposed[i], self.next_clock[i], self.mark[i] = 0, -1, mark
                elif exposed != WHOLE and version > self.version[i]:
                    self.next_clock[i], self.next_buffer[i] = clock, buffer
                    self.exposed[i], self.mark[i] = exposed, mark
                self._reqs[i] = req = self.comm.Irecv(self._bufs[i], source=self.servers[i], tag=Tag.NOTICE)
        return moved

    def readable(self, i: int, need: int) -> tuple[int, int]:
        """(buckets readable, buffer) of server ``i``'s first version with clock >= ``need``:
        ``WHOLE`` once published, the buckets exposed while it is applied, 0 before."""
        if self.clock[i] >= need:
            return WHOLE, self.buffer[i]
        if self.next_clock[i] >= need:
            return int(self.exposed[i]), self.next_buffer[i]
        return 0, 0

    def wait(self, need: int, what: Callable[[], str], timeout: float) -> None:
        """Until every server's clock is at least ``need``; StallError naming ``what()`` after
        ``timeout`` seconds without a notice."""
        self._until(lambda: int(self.clock.min()) >= need, what, timeout)

    def wait_started(self, need: int, what: Callable[[], str], timeout: float) -> None:
        """Until every server has exposed a bucket of a version with clock >= ``need``."""
        self._until(lambda: all(self.readable(i, need)[0] for i in range(len(self.servers))), what, timeout)

    def close(self, timeout: float) -> None:
        """After this worker's stop message: receive every notice up to each server's last."""
        self._until(lambda: all(self.ended), "every server's last notice", timeout)

    def _until(self, done: Callable[[], bool], what: str | Callable[[], str], timeout: float) -> None:
        def ready() -> bool:
            self.poll()
            return done()

        wait_for(ready, what, timeout, backoff=Backoff.for_messages())

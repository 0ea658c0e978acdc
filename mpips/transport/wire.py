"""The wire format: tags, codec ids, status slots, push header, trailer and layout. Pure (no MPI).

Every constant that goes over the wire is defined here, once: the tags of every message
(``Tag``), the codec id in a push header (``Codec``; ``mpips.compression``'s codecs take their
``wire_id`` from it), the int64 slots of a window's status block (``Slot``), the push header and
trailer and their magic numbers, the element types of a published shard (``PULL_CODECS``), the
words of a bsp notice and the header words of a data server's batch messages (their format:
``mpips.transport.batches``).

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

A window holds a 64-byte status block (int64 slots, see ``Slot``) followed by the shard (float32,
or bf16/fp16 with ``--pull-codec``: pulls widen it);
a window pull ``Rget``s the status block, then the shard in chunks, under one shared lock. A
message pull (tag ``PULL_REQUEST``, one int64: the clock needed) is answered with the same bytes
(status block + shard) in chunks, tag ``PULL_REPLY``. The final parameters go from each server
to the lead worker in chunks, tag ``FINAL``; checkpoint pieces, where h5py has no MPI-IO, go to
rank 0 in chunks, tag ``CHECKPOINT``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from mpips.chunking import MAX_CHUNK_BYTES, chunks

__all__ = [
    "BATCH_DONE",
    "BATCH_MAGIC",
    "BATCH_REPLY_HEADER",
    "BATCH_REQUEST_WORDS",
    "BATCH_SAMPLES",
    "FP16_MAX",
    "HEADER_BYTES",
    "MAGIC",
    "NOTICE_WORDS",
    "PROTOCOL",
    "PULL_CODECS",
    "STREAMED",
    "TAIL_MAGIC",
    "TRAILER_BYTES",
    "WHOLE",
    "Codec",
    "MalformedMessage",
    "PushHeader",
    "PushLayout",
    "PushTrailer",
    "Slot",
    "StallError",
    "Tag",
    "narrow",
    "widen",
]

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
    CONTROL = 20  # worker -> server or data server, pickled: ("register", n), ("loader", request), ("finish", w)
    DATA_REQUEST = 21  # worker -> data server: sample ids wanted, or done
    DATA = 22  # data server -> worker: the samples
    MASTER = 23  # server -> worker, asked by a MASTER push (--lookahead): the optimizer's own shard


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
    MASTER = 253  # no payload: asp/ssp with --lookahead: send me the optimizer's own values (Tag.MASTER)
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
        header_only = (Codec.JOIN, Codec.STOP, Codec.MASTER)
        if streamed and (nbytes != HEADER_BYTES or not 0 < length <= max_payload or codec in header_only):
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


# bsp notices (mpips.transport.notice)
NOTICE_WORDS = 5  # int64: clock, exposed buffer index, version, buckets exposed, checkpoint mark
WHOLE = 1 << 62  # "buckets exposed" of a published version: all of them, and its status block

# batch requests and replies between workers and data servers (mpips.transport.batches)
BATCH_MAGIC = 0x4D505344  # "MPSD"
BATCH_REQUEST_WORDS = 6  # int64 header words of a request
BATCH_REPLY_HEADER = 64  # bytes of a reply's header
BATCH_SAMPLES, BATCH_DONE = 0, 1  # kinds of request

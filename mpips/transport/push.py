"""Pushes: ``Pusher`` sends a worker's gradient to the servers, ``PushReceiver`` takes them in.

The messages of a push (one message, or header, chunks last first, tail) are described in
``mpips.transport.wire``.

MPI keeps the messages of one sender, tag and communicator in order, so chunks need no sequence
numbers: the server posts its receives in the order they are sent. ``PushReceiver`` validates a
header as soon as it arrives, before it receives anything more, checks every chunk's size and the
trailer (the header's worker and step), and hands a push on only once its tail is in: with the
trailer's norm and loss in the header, and the payload laid out as a one-message push's (records
moved together where one is shorter than its slot). Nothing is applied before a whole push is in
and valid (``MalformedMessage`` otherwise, naming the worker). The ``Issend`` keeps a push in
flight (``--max-inflight``) until the server has matched its last message, whatever the MPI's
eager limit.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from mpips import faults
from mpips.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, chunks
from mpips.transport.chunked import bytes_of, nbytes_of, send_chunks, wait_all
from mpips.transport.wire import HEADER_BYTES, TRAILER_BYTES, MalformedMessage, PushHeader, PushLayout, PushTrailer, Tag

__all__ = [
    "PushReceiver",
    "Pusher",
]


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
        raw = bytes_of(part)
        n = nbytes_of(raw)
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
            parts = [bytes_of(p) for p in body]
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

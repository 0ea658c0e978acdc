"""The transport layer: parameter windows, tagged push messages, pull requests, cheap waits.

Roles call these classes and never MPI point-to-point or RMA directly. Buffers are plain,
contiguous numpy arrays (host memory), so other buffer kinds can replace them later.

Wire format of a push (one message, tag PUSH): a 64-byte header (``PushHeader``) followed by
``length`` payload bytes (the gradient slice for one server, encoded by ``codec``). A window
holds a 64-byte status block (int64 slots, see ``Slot``) followed by the float32 shard.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from mpi4py import MPI

from mpips import faults

__all__ = [
    "HEADER_BYTES",
    "Backoff",
    "Codec",
    "MalformedMessage",
    "MessagePuller",
    "ParameterWindow",
    "PullServer",
    "PushHeader",
    "PushReceiver",
    "Pusher",
    "Slot",
    "StallError",
    "Tag",
    "wait_for",
]

log = logging.getLogger("mpips.transport")

HEADER_BYTES = 64
PROTOCOL = 1
MAGIC = 0x4D505053  # "MPPS"


class Tag(IntEnum):
    PUSH = 11
    PULL_REQUEST = 12
    PULL_REPLY = 13
    DATA_REQUEST = 21  # worker -> data server: sample ids wanted, or done
    DATA = 22  # data server -> worker: the samples


class Codec(IntEnum):
    RAW32 = 0  # float32 values, one per shard element, then one uint8 per tensor run: has a gradient
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


class MalformedMessage(ValueError):
    """A push failed validation; nothing was applied."""


class StallError(RuntimeError):
    """A wait made no progress within the stall timeout; the message says what it waited for."""


class Backoff:
    """Sleep between polls: starts at ``low`` seconds, doubles up to ``high``. Never spins hot."""

    def __init__(self, low: float = 20e-6, high: float = 2e-3):
        self.low, self.high, self.delay = low, high, low

    def reset(self) -> None:
        self.delay = self.low

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.high, self.delay * 2)


def wait_for(ready: Callable[[], bool], what: str | Callable[[], str], timeout: float) -> None:
    """Poll ``ready()`` with backoff until it is true; StallError after ``timeout`` seconds.

    ``what`` (or what it returns, called at the timeout) names the peers, window or tag waited for.
    """
    backoff, start = Backoff(), time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            since = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - start)))
            raise StallError(f"no progress for {timeout:.0f} s while waiting for"
                             f" {what() if callable(what) else what}, since {since}")
        backoff.wait()


@dataclass(frozen=True)
class PushHeader:
    """Metadata in front of every push. All fields are validated by ``decode``."""

    step: int  # the worker's global step this gradient belongs to
    worker: int  # worker index (0..W-1)
    codec: int
    samples: int  # samples the gradient averages over (0 for an empty last batch)
    clock_seen: int  # slowest-worker clock of the parameters the gradient was computed on (JOIN: the mark)
    length: int  # payload bytes
    grad_norm: float  # L2 norm of the worker's whole gradient (all servers' slices)
    loss: float
    applied_seen: int = 0  # gradients this server had applied when the worker pulled

    _FORMAT = struct.Struct("<IHHqiiqqddq")  # 64 bytes: HEADER_BYTES

    def pack_into(self, buf: np.ndarray) -> None:
        self._FORMAT.pack_into(
            buf, 0, MAGIC, PROTOCOL, self.codec, self.step, self.worker, self.samples,
            self.clock_seen, self.length, self.grad_norm, self.loss, self.applied_seen,
        )

    @classmethod
    def decode(cls, buf: np.ndarray, nbytes: int, *, worker: int, max_payload: int) -> PushHeader:
        """Parse and validate a received message of ``nbytes`` from worker ``worker``."""
        if nbytes < HEADER_BYTES:
            raise MalformedMessage(f"push from worker {worker}: {nbytes} bytes, shorter than a header")
        magic, proto, codec, step, w, samples, clock, length, norm, loss, applied = cls._FORMAT.unpack_from(buf, 0)
        problems = []
        if magic != MAGIC:
            problems.append(f"bad magic {magic:#x}")
        if proto != PROTOCOL:
            problems.append(f"protocol {proto}, expected {PROTOCOL}")
        if codec not in Codec.__members__.values():
            problems.append(f"unknown codec {codec}")
        if w != worker:
            problems.append(f"claims worker {w}")
        if step < 0 or samples < 0 or (clock < -1 and codec != Codec.JOIN) or applied < 0:
            problems.append(f"negative step/samples/clock/applied ({step}/{samples}/{clock}/{applied})")
        if length != nbytes - HEADER_BYTES or length > max_payload:
            problems.append(f"payload length {length} (received {nbytes - HEADER_BYTES}, max {max_payload})")
        if problems:
            raise MalformedMessage(f"malformed push from worker {worker}: " + "; ".join(problems))
        return cls(step, w, codec, samples, clock, length, norm, loss, applied)


class ParameterWindow:
    """A server's shard, published to workers through two RMA windows (a versioned double buffer).

    A server optimizes a private copy (``params``, with its private ``status`` block) and
    ``publish()`` copies both into whichever of its two exposed buffers holds the older version,
    under an exclusive lock on that buffer alone. Workers read the newer buffer under a shared
    lock, so a pull always sees one whole version, and a server update never waits on the pulls
    of the current version: only on a pull still reading the version before it. (With a single
    locked buffer, workers pulling back to back starved the server's exclusive lock forever:
    measured with Open MPI 4.1 osc/rdma.)

    Each rank also exposes a small doorbell block that peers raise atomically (``raise_flag``)
    and the owner reads (``flag``). Workers expose nothing else. Creation and ``free()`` are
    collective over ``comm``.
    """

    def __init__(self, comm: MPI.Comm, shard_elements: int, init: np.ndarray | None = None):
        """``init``: the shard's initial values; a contiguous float32 vector becomes the working copy."""
        self.comm = comm
        n = shard_elements
        # server's working copy: ``init`` itself where it is a float32 vector (no second copy);
        # set before the windows exist, so no pull can see uninitialised memory
        if init is not None and init.dtype == np.float32 and init.flags.c_contiguous and init.size == n:
            self.params = init
        else:
            self.params = np.zeros(n, dtype=np.float32)
            if init is not None:
                self.params[:] = init
        self.status = np.zeros(HEADER_BYTES // 8, dtype=np.int64)  # server's working status
        nbytes = HEADER_BYTES + 4 * n if n else 0
        # Win.Create over our own buffers: passive Get measured ~3x faster than Win.Allocate here.
        self._memory = [np.zeros(max(nbytes, HEADER_BYTES), dtype=np.uint8) for _ in range(2)]
        for i, mem in enumerate(self._memory):
            mem[HEADER_BYTES:nbytes].view(np.float32)[:] = self.params
            mem[:HEADER_BYTES].view(np.int64)[Slot.VERSION] = -i  # buffer 0 is current
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

    def published(self) -> np.ndarray:
        """Server: the bytes of the current version (status block + shard)."""
        return self._memory[self._current()]

    def publish(self) -> None:
        """Server: make ``params`` and ``status`` the next version, atomically for readers."""
        me, cur = self.comm.Get_rank(), self._current()
        stale = 1 - cur
        mem = self._memory[stale]
        self.status[Slot.VERSION] = int(self._memory[cur][:HEADER_BYTES].view(np.int64)[Slot.VERSION]) + 1
        if self.rma:
            self.wins[stale].Lock(me, MPI.LOCK_EXCLUSIVE)
        try:
            mem[HEADER_BYTES:].view(np.float32)[:] = self.params
            mem[:HEADER_BYTES].view(np.int64)[:] = self.status
        finally:
            if self.rma:
                self.wins[stale].Unlock(me)

    def _lock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Lock(t, MPI.LOCK_SHARED)

    def _unlock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Unlock(t)

    def read_status(self, targets: list[int], out: np.ndarray) -> list[int]:
        """Worker: the newest status block of each target into ``out[i]``; returns buffer indices."""
        both = np.empty((len(targets), 2, HEADER_BYTES // 8), dtype=np.int64)
        for b in (0, 1):
            self._lock_all(targets, [b] * len(targets))
            reqs = [self.wins[b].Rget(both[i, b], t, (0, HEADER_BYTES, MPI.BYTE)) for i, t in enumerate(targets)]
            MPI.Request.Waitall(reqs)
            self._unlock_all(targets, [b] * len(targets))
        newest = [int(np.argmax(both[i, :, Slot.VERSION])) for i in range(len(targets))]
        for i, b in enumerate(newest):
            out[i] = both[i, b]
        return newest

    def pull(
        self, targets: list[int], status: np.ndarray, shards: list[np.ndarray], which: list[int] | None = None
    ) -> None:
        """Worker: status block and shard of the newest version of every target, whole.

        ``which``: the buffer indices a ``read_status`` just returned, to skip reading them again.
        That buffer is then at least as new as the status read: a server only rewrites a buffer
        with the version after the other buffer's, and whatever is read under the lock is whole.
        """
        if which is None:
            which = self.read_status(targets, status)
        self._lock_all(targets, which)
        reqs = []
        for i, (t, b) in enumerate(zip(targets, which, strict=True)):
            reqs.append(self.wins[b].Rget(status[i], t, (0, HEADER_BYTES, MPI.BYTE)))
            reqs.append(self.wins[b].Rget(shards[i], t, (HEADER_BYTES, 4 * shards[i].size, MPI.BYTE)))
        MPI.Request.Waitall(reqs)
        self._unlock_all(targets, which)

    def raise_flag(self, target: int, slot: int, value: int) -> None:
        """Atomically raise doorbell ``slot`` of ``target`` to at least ``value`` (MPI_MAX).

        Without RMA windows there is no doorbell: a no-op (Slurm signals every rank anyway).
        """
        if not self.rma:
            return
        win = self.wins[2]
        win.Lock(target, MPI.LOCK_SHARED)
        # origin and target must name the same datatype: numpy's int64 maps to MPI_LONG (ERR_ARG)
        win.Accumulate([np.array([value], dtype=np.int64), MPI.INT64_T], target, (slot, 1, MPI.INT64_T), op=MPI.MAX)
        win.Unlock(target)

    def flag(self, slot: int) -> int:
        """This rank's doorbell ``slot``, read atomically (0 without RMA windows)."""
        if not self.rma:
            return 0
        win, me, out = self.wins[2], self.comm.Get_rank(), np.zeros(1, dtype=np.int64)
        win.Lock(me, MPI.LOCK_SHARED)
        win.Get_accumulate(np.zeros(1, dtype=np.int64), out, me, (slot, 1, MPI.INT64_T), op=MPI.NO_OP)
        win.Unlock(me)
        return int(out[0])

    def free(self) -> None:
        """Collective; idempotent."""
        if self._wins is not None:
            for win in self._wins:
                win.Free()
            self._wins = None


class Pusher:
    """Worker side: nonblocking pushes to servers, at most ``max_inflight`` outstanding per server."""

    def __init__(self, comm: MPI.Comm, servers: list[int], max_payload: list[int], max_inflight: int):
        """``max_payload[s]``: the largest payload in bytes that server index ``s`` is sent."""
        self.comm, self.servers = comm, servers
        self.buffers = [
            [np.empty(HEADER_BYTES + n, dtype=np.uint8) for _ in range(max_inflight)]
            for n in max_payload
        ]
        self.pending: list[deque[tuple[MPI.Request, int]]] = [deque() for _ in servers]
        self.next_slot = [0] * len(servers)
        self.bytes_sent = 0

    def _free_slot(self, s: int) -> np.ndarray:
        queue = self.pending[s]
        if len(queue) == len(self.buffers[s]):
            req, _ = queue.popleft()
            wait_request(req)
        slot = self.next_slot[s]
        self.next_slot[s] = (slot + 1) % len(self.buffers[s])
        return self.buffers[s][slot]

    def push(self, s: int, header: PushHeader, *payload: np.ndarray) -> None:
        """Send ``header`` and the ``payload`` arrays, concatenated as bytes, to server index ``s``."""
        buf = self._free_slot(s)
        header.pack_into(buf)
        faults.at("push", header.step, message=buf)
        n, at = HEADER_BYTES + header.length, HEADER_BYTES
        for part in payload:
            raw = np.frombuffer(part, dtype=np.uint8)
            buf[at : at + raw.size] = raw
            at += raw.size
        if at != n:
            raise ValueError(f"push header says {header.length} payload bytes, got {at - HEADER_BYTES}")
        req = self.comm.Isend(buf[:n], dest=self.servers[s], tag=Tag.PUSH)
        self.pending[s].append((req, n))
        self.bytes_sent += n

    def drain(self) -> None:
        for queue in self.pending:
            while queue:
                wait_request(queue.popleft()[0])


def wait_request(req: MPI.Request, what: str = "a send to complete", timeout: float = 300.0) -> MPI.Status:
    status = MPI.Status()
    wait_for(lambda: req.Test(status), what, timeout)
    return status


class PushReceiver:
    """Server side: one receive posted ahead per worker; ``poll`` returns the ready ones."""

    def __init__(self, comm: MPI.Comm, workers: list[int], max_payload: int):
        self.comm, self.workers, self.max_payload = comm, workers, max_payload
        self.buffers = [np.empty(HEADER_BYTES + max_payload, dtype=np.uint8) for _ in workers]
        self.requests = [MPI.REQUEST_NULL] * len(workers)
        self.bytes_received = 0
        for w in range(len(workers)):
            self.repost(w)

    def repost(self, w: int) -> None:
        self.requests[w] = self.comm.Irecv(self.buffers[w], source=self.workers[w], tag=Tag.PUSH)

    def poll(self) -> list[tuple[int, PushHeader, np.ndarray]]:
        """Completed pushes as (worker index, validated header, payload bytes view).

        The caller must ``repost(w)`` once it has consumed the payload of worker ``w``.
        """
        statuses: list[MPI.Status] = []
        done = MPI.Request.Testsome(self.requests, statuses)
        out = []
        for w, st in zip(done or [], statuses, strict=True):
            nbytes = st.Get_count(MPI.BYTE)
            self.bytes_received += nbytes
            header = PushHeader.decode(self.buffers[w], nbytes, worker=w, max_payload=self.max_payload)
            out.append((w, header, self.buffers[w][HEADER_BYTES : HEADER_BYTES + header.length]))
        return out

    def cancel(self) -> None:
        for req in self.requests:
            if req != MPI.REQUEST_NULL:
                req.Cancel()
                req.Wait()


class PullServer:
    """Server side of message-based pulls, for MPI libraries without passive-target progress.

    A worker sends the clock it needs; the reply (status block + shard) goes out once this
    server's clock reaches it. Replies are sent from the published buffer, so the server must
    call ``flush()`` before it publishes again.
    """

    def __init__(self, comm: MPI.Comm, window: ParameterWindow):
        self.comm, self.window = comm, window
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
        still = []
        for source, need in self.waiting:
            if clock >= need or mark:  # a checkpoint mark: the waiting worker must see it and join
                self.sending.append(self.comm.Isend(current, dest=source, tag=Tag.PULL_REPLY))
                moved = True
            else:
                still.append((source, need))
        self.waiting = still
        return moved

    def flush(self) -> None:
        for req in self.sending:
            wait_request(req, "a pull reply to be received")
        self.sending.clear()

    def close(self) -> None:
        self.flush()
        self.request.Cancel()
        self.request.Wait()


class MessagePuller:
    """Worker side of message-based pulls (see PullServer)."""

    def __init__(self, comm: MPI.Comm, servers: list[int], shard_sizes: list[int], stall_timeout: float):
        self.comm, self.servers, self.timeout = comm, servers, stall_timeout
        self.buffers = [np.empty(HEADER_BYTES + 4 * n, dtype=np.uint8) for n in shard_sizes]
        self.need = np.zeros(1, dtype=np.int64)

    def pull(self, need: int, status: np.ndarray, shards: list[np.ndarray]) -> None:
        self.need[0] = need
        reqs = [
            self.comm.Irecv(b, source=s, tag=Tag.PULL_REPLY)
            for b, s in zip(self.buffers, self.servers, strict=True)
        ]
        sends = [self.comm.Isend(self.need, dest=s, tag=Tag.PULL_REQUEST) for s in self.servers]
        wait_for(lambda: MPI.Request.Testall(reqs + sends), lambda: self._lagging(need, reqs, status), self.timeout)
        for i, b in enumerate(self.buffers):
            status[i] = b[:HEADER_BYTES].view(np.int64)
            shards[i][:] = b[HEADER_BYTES:].view(np.float32)

    def _lagging(self, need: int, replies: list[MPI.Request], status: np.ndarray) -> str:
        """Which servers have not replied, for the stall message (as the window path names them)."""
        late = [(s, rank) for s, (req, rank) in enumerate(zip(replies, self.servers, strict=True))
                if not req.Get_status()]
        return (f"the servers to reach clock {need} (pull replies; clocks as of the last pull): "
                + ", ".join(f"server {s} (rank {rank} of the parameter-server communicator)"
                            f" at clock {int(status[s, Slot.CLOCK])}" for s, rank in late))

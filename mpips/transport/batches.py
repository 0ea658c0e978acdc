"""Batch messages between workers and data servers (``mpips.dataserver``).

Wire format (world communicator; the constants are in ``mpips.transport.wire``). A request (tag
``DATA_REQUEST``) is int64 ``[BATCH_MAGIC, kind, worker, epoch, step, n, id_0 .. id_n-1]``; kind
``BATCH_DONE`` (n = 0) is the worker's last message. A reply (tag ``DATA``) is a 64-byte int64
header ``[BATCH_MAGIC, worker, epoch, step, n, payload bytes, 0, 0]`` followed by the samples'
stored fields, each field's rows contiguous (``SampleFormat.pack``). A worker's requests to one
server are answered in order, so its receives, posted ahead, match by order; the header is
checked all the same.

``BatchResponder`` is the data server's side (requests in, replies out), ``BatchRequester`` the
worker's (requests out, replies in, the done message).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpips.transport.chunked import wait_for
from mpips.transport.wire import (
    BATCH_DONE,
    BATCH_MAGIC,
    BATCH_REPLY_HEADER,
    BATCH_REQUEST_WORDS,
    BATCH_SAMPLES,
    Tag,
)

__all__ = [
    "BatchRequest",
    "BatchRequester",
    "BatchResponder",
    "PostedBatch",
]

@dataclass(frozen=True)
class BatchRequest:
    """A validated request of worker index ``worker``: sample ``ids`` of (``epoch``, ``step``),
    or its done message (``done``, no ids)."""

    worker: int
    epoch: int
    step: int
    ids: np.ndarray
    done: bool


class BatchResponder:
    """Data server: one request receive posted per worker; replies sent without blocking.

    Args:
        comm: communicator shared with the workers (the world).
        workers: the workers' ranks in ``comm``, by worker index.
        max_ids: the largest request (the per-worker batch size).
        name: who answers, for error messages (``data server 0``).
    """

    def __init__(self, comm: MPI.Comm, workers: list[int], max_ids: int, name: str):
        self.comm, self.workers, self.max_ids, self.name = comm, workers, max_ids, name
        self.buffers = [np.empty(BATCH_REQUEST_WORDS + max_ids, dtype=np.int64) for _ in workers]
        self.requests = [self._post(w) for w in range(len(workers))]
        self.sending: list[tuple[MPI.Request, np.ndarray]] = []

    def _post(self, w: int) -> MPI.Request:
        return self.comm.Irecv(self.buffers[w], source=self.workers[w], tag=Tag.DATA_REQUEST)

    def poll(self) -> list[int]:
        """The worker indices whose request has come (take each with ``take``)."""
        statuses: list[MPI.Status] = []
        return MPI.Request.Testsome(self.requests, statuses) or []

    def progress(self) -> None:
        """Forget the replies the workers have received."""
        self.sending = [(r, b) for r, b in self.sending if not r.Test()]

    def take(self, w: int) -> BatchRequest:
        """Worker ``w``'s request that came, validated (RuntimeError naming the worker otherwise).

        After a done message nothing more is received from ``w``; after a request for samples,
        ``repost(w)`` receives its next.
        """
        head = self.buffers[w][:BATCH_REQUEST_WORDS]
        magic, kind, worker, epoch, step, n = (int(v) for v in head)
        if (
            magic != BATCH_MAGIC
            or worker != w
            or not 0 <= n <= self.max_ids
            or kind not in (BATCH_SAMPLES, BATCH_DONE)
        ):
            raise RuntimeError(
                f"{self.name}: malformed request from worker {w}: {head.tolist()}"
            )
        if kind == BATCH_DONE:
            self.requests[w] = MPI.REQUEST_NULL
            return BatchRequest(w, epoch, step, np.empty(0, dtype=np.int64), True)
        ids = self.buffers[w][BATCH_REQUEST_WORDS : BATCH_REQUEST_WORDS + n].copy()
        return BatchRequest(w, epoch, step, ids, False)

    def repost(self, w: int) -> None:
        """Receive worker ``w``'s next request (its last one has been taken)."""
        self.requests[w] = self._post(w)

    @staticmethod
    def reply_buffer(n: int, record_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """A reply for ``n`` samples of ``record_bytes`` each: (the whole reply, the bytes its
        samples go in)."""
        reply = np.empty(BATCH_REPLY_HEADER + n * record_bytes, dtype=np.uint8)
        return reply, reply[BATCH_REPLY_HEADER:]

    def reply(self, request: BatchRequest, reply: np.ndarray) -> None:
        """Send ``reply`` (from ``reply_buffer``, its samples filled in) to the worker that made
        ``request``; it must stay unchanged until sent (``close``)."""
        n = len(request.ids)
        nbytes = reply.nbytes - BATCH_REPLY_HEADER
        head = (BATCH_MAGIC, request.worker, request.epoch, request.step, n, nbytes, 0, 0)
        reply[:BATCH_REPLY_HEADER].view(np.int64)[:] = head
        self.sending.append((self.comm.Isend(reply, dest=self.workers[request.worker], tag=Tag.DATA), reply))

    def close(self, timeout: float) -> None:
        """Complete the outstanding replies, then cancel the request receives still posted."""
        for req, _ in self.sending:
            wait_for(req.Test, "a worker to receive its batch", timeout)
        self.sending.clear()
        for req in self.requests:
            if req != MPI.REQUEST_NULL:
                req.Cancel()
                req.Wait()


@dataclass
class PostedBatch:
    """A request sent to one data server and the receive of its reply."""

    reply: np.ndarray
    recv: MPI.Request
    send: MPI.Request
    request: np.ndarray  # kept alive until the send completes


class BatchRequester:
    """Worker index ``worker``: requests to data servers and the receives of their replies.

    Args:
        comm: communicator shared with the data servers (the world).
        worker: this worker's index.
    """

    def __init__(self, comm: MPI.Comm, worker: int):
        self.comm, self.worker = comm, worker

    def post(self, dest: int, epoch: int, step: int, ids: np.ndarray, record_bytes: int) -> PostedBatch:
        """Ask rank ``dest`` for the samples ``ids`` of (``epoch``, ``step``); the reply's receive
        is posted first."""
        request = np.concatenate(
            [[BATCH_MAGIC, BATCH_SAMPLES, self.worker, epoch, step, len(ids)], ids]
        ).astype(np.int64)
        reply = np.empty(BATCH_REPLY_HEADER + len(ids) * record_bytes, dtype=np.uint8)
        recv = self.comm.Irecv(reply, source=dest, tag=Tag.DATA)
        send = self.comm.Isend(request, dest=dest, tag=Tag.DATA_REQUEST)
        return PostedBatch(reply, recv, send, request)

    @staticmethod
    def wait(posted: list[PostedBatch], what: str, timeout: float) -> None:
        """Until every request is sent and every reply in; StallError naming ``what`` otherwise."""
        reqs = [r for p in posted for r in (p.recv, p.send)]
        wait_for(lambda: MPI.Request.Testall(reqs), what, timeout)

    def samples(self, posted: PostedBatch, epoch: int, step: int, n: int, server: int) -> np.ndarray:
        """The sample bytes of a reply that came, its header checked (RuntimeError naming data
        server index ``server`` otherwise)."""
        head = posted.reply[:BATCH_REPLY_HEADER].view(np.int64)
        expect = (BATCH_MAGIC, self.worker, epoch, step, n)
        if tuple(int(v) for v in head[:5]) != expect:
            raise RuntimeError(
                f"worker {self.worker}: data server {server} sent {head[:5].tolist()},"
                f" expected {expect}"
            )
        return posted.reply[BATCH_REPLY_HEADER:]

    def done(self, data_servers: tuple[int, ...], timeout: float) -> None:
        """Tell every data server (their ranks) that this worker is done."""
        done = np.array([BATCH_MAGIC, BATCH_DONE, self.worker, 0, 0, 0], dtype=np.int64)
        sends = [self.comm.Isend(done, dest=d, tag=Tag.DATA_REQUEST) for d in data_servers]
        wait_for(
            lambda: MPI.Request.Testall(sends),
            "the data servers to take the done message",
            timeout,
        )

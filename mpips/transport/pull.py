"""Message pulls, for MPI libraries without passive-target progress (no RMA windows).

A worker sends the clock it needs (tag ``PULL_REQUEST``, one int64); its server answers once its
clock reaches it with the bytes a window pull reads (status block + shard), in chunks, tag
``PULL_REPLY``.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpips.chunking import DEFAULT_CHUNK_BYTES
from mpips.transport.chunked import recv_chunks, send_chunks, wait_all, wait_for
from mpips.transport.window import ParameterWindow
from mpips.transport.wire import HEADER_BYTES, PULL_CODECS, Slot, Tag, widen

__all__ = [
    "MessagePuller",
    "PullServer",
]


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


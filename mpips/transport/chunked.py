"""Chunked transfers and cheap waits: the only MPI calls that move shards, and the polls that
wait for them.

Chunks. No MPI call here moves more than ``chunk_bytes`` bytes (``--chunk-bytes``, capped at
``MAX_CHUNK_BYTES``, 1 GiB; see ``mpips.chunking``): Open MPI 4.1 is MPI-3.1, whose counts are C
ints, so one call of more than 2**31-1 elements fails. Every transfer goes through
``send_chunks`` / ``recv_chunks`` / ``get_chunks``, which cut a buffer's bytes with
``chunks(nbytes, chunk_bytes)`` into consecutive ranges of ``chunk_bytes`` (the last shorter)
and move each range as bytes (``MPI.BYTE``) with one call. MPI keeps the messages of one
sender, tag and communicator in order, so the chunks of a transfer need no sequence numbers;
sender and receiver cut with the same ``chunk_bytes`` (one setting for the whole job).

Waits poll with backoff (``Backoff``, ``wait_for``, ``wait_all``) and raise ``StallError``
naming what they waited for after a stall timeout; they never spin hot.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from mpips.chunking import chunks
from mpips.transport.wire import StallError

__all__ = [
    "Backoff",
    "bytes_of",
    "get_chunks",
    "nbytes_of",
    "recv_chunks",
    "send_chunks",
    "wait_all",
    "wait_for",
]


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
def bytes_of(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A uint8 view (no copy) of a C-contiguous array, or of a contiguous torch tensor (device
    memory on the direct path: mpi4py takes it through DLPack / ``__cuda_array_interface__``)."""
    if isinstance(array, torch.Tensor):
        if not array.is_contiguous():
            raise ValueError("chunked transfers need contiguous buffers")
        return array.reshape(-1).view(torch.uint8)
    if not array.flags.c_contiguous:
        raise ValueError("chunked transfers need C-contiguous buffers")
    return array.reshape(-1).view(np.uint8)


def nbytes_of(raw: np.ndarray | torch.Tensor) -> int:
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
    raw = bytes_of(data)
    cuts = chunks(nbytes_of(raw), chunk_bytes)
    requests = []
    for i, (a, b) in enumerate(cuts):
        send = comm.Issend if synchronous_last and i == len(cuts) - 1 else comm.Isend
        chunk_tag = first_tag if i == 0 and first_tag is not None else tag
        requests.append(send([raw[a:b], MPI.BYTE], dest=dest, tag=chunk_tag))
    return requests


def recv_chunks(comm: MPI.Comm, out: np.ndarray, source: int, tag: int, chunk_bytes: int) -> list[MPI.Request]:
    """``Irecv`` into the bytes of ``out`` from ``source`` in chunks, as ``send_chunks`` cut them."""
    raw = bytes_of(out)
    return [comm.Irecv([raw[a:b], MPI.BYTE], source=source, tag=tag) for a, b in chunks(nbytes_of(raw), chunk_bytes)]


def get_chunks(win: MPI.Win, out: np.ndarray, target: int, disp: int, chunk_bytes: int) -> list[MPI.Request]:
    """``Rget`` bytes ``disp .. disp + out.nbytes`` of ``target``'s window into ``out``, in chunks.

    Call inside a passive-target epoch (a lock on ``target``); the window's disp_unit must be 1.
    Displacements are MPI_Aint, so windows over 2 GiB are fine (measured: Open MPI 4.1).
    """
    raw = bytes_of(out)
    return [
        win.Rget([raw[a:b], MPI.BYTE], target, (disp + a, b - a, MPI.BYTE))
        for a, b in chunks(nbytes_of(raw), chunk_bytes)
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

"""Rows of sparse tables by key: a worker's pull, push and export requests, a server's replies.

Messages, not windows: a pull names rows scattered over the shard, so one-sided gets would be
one ``MPI_Get`` per row (or an indexed datatype built per batch), and in bsp and ssp the server
must hold the answer until the version the worker may read is applied anyway; a request and a
reply cost two messages and one ``index_select`` on the server, whatever the rows.

Each table of a registered model has four tags on the model's communicator (``row_tags``):
a request header, its keys, its values (a push) and the reply. A request is an int64 header
``[kind, step, n]`` then ``n`` int64 local keys and, for a push, ``n x dim`` values, each sent
with ``send_chunks`` (no call over ``chunk_bytes``, the 2 GiB rule). MPI keeps one sender's
messages of one tag in order, so a server that takes a header takes the keys and values right
behind it, and a worker's replies of one table come in the order of its requests (a server
answers them in that order).

Rows travel as float32, or as fp16 / bf16 with ``--pull-codec`` (pulls) and ``--compress``
(pushes) of that name; the server's rows and optimizer stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from mpi4py import MPI

from mpips.transport.chunked import recv_chunks, send_chunks, wait_all
from mpips.transport.wire import MalformedMessage

__all__ = ["EXPORT_CODEC", "RowCodec", "RowKind", "RowRequest", "expect_rows", "receive_request", "row_tags",
           "send_request", "send_rows"]

ROW_TAG_BASE = 100  # tags 100 + 4 * table .. + 3: far from mpips.transport.Tag's


class RowKind(IntEnum):
    PULL = 0  # rows wanted at a step: answered once the version the step may read is applied
    PUSH = 1  # row gradients of a step
    EXPORT = 2  # every row of the server's shard (emb.state_dict())
    PUSH_PULLED = 3  # row gradients of a step for the keys of this worker's last pull of that step: no keys sent


def row_tags(table: int) -> tuple[int, int, int, int]:
    """(request, keys, values, reply) tags of table ``table`` of a model."""
    base = ROW_TAG_BASE + 4 * table
    return base, base + 1, base + 2, base + 3


class RowCodec:
    """How rows travel: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""

    DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, name: str = "fp32"):
        self.name = name if name in self.DTYPES else "fp32"
        self.dtype = self.DTYPES[self.name]

    def encode(self, rows: torch.Tensor) -> np.ndarray:
        """The bytes of ``rows`` as they travel (a new array: keep it until its sends complete)."""
        return rows.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().reshape(-1).copy()

    def buffer(self, n: int, dim: int) -> np.ndarray:
        return np.empty(n * dim * self.dtype.itemsize, dtype=np.uint8)

    def decode(self, raw: np.ndarray, n: int, dim: int) -> torch.Tensor:
        return torch.from_numpy(raw).view(self.dtype).reshape(n, dim).to(torch.float32)


EXPORT_CODEC = RowCodec("fp32")  # a whole shard for emb.state_dict() travels as it is held


@dataclass
class RowRequest:
    """A worker's request as a server took it."""

    source: int  # rank in the model's communicator
    kind: RowKind
    step: int
    keys: torch.Tensor  # int64 local keys (PUSH_PULLED: none; the server knows them from the pull)
    values: torch.Tensor | None  # float32 [n, dim], a push's


def send_request(comm: MPI.Comm, dest: int, table: int, kind: RowKind, step: int, keys: torch.Tensor,
                 values: np.ndarray | None, chunk_bytes: int) -> tuple[list[MPI.Request], list[np.ndarray]]:
    """Isend a request; returns the requests and the buffers to keep until they complete."""
    request, key_tag, value_tag, _ = row_tags(table)
    header = np.array([int(kind), step, len(keys)], dtype=np.int64)
    raw_keys = keys.to(torch.int64).contiguous().numpy()
    reqs = [comm.Isend([header, MPI.INT64_T], dest=dest, tag=request)]
    if len(keys):
        if kind != RowKind.PUSH_PULLED:
            reqs += send_chunks(comm, raw_keys, dest, key_tag, chunk_bytes)
        if values is not None:
            reqs += send_chunks(comm, values, dest, value_tag, chunk_bytes)
    return reqs, [header, raw_keys] + ([values] if values is not None else [])


def expect_rows(comm: MPI.Comm, source: int, table: int, raw: np.ndarray, chunk_bytes: int) -> list[MPI.Request]:
    """Irecv a reply into ``raw`` (``RowCodec.buffer``)."""
    return recv_chunks(comm, raw, source, row_tags(table)[3], chunk_bytes) if raw.size else []


def send_rows(comm: MPI.Comm, dest: int, table: int, raw: np.ndarray, chunk_bytes: int) -> list[MPI.Request]:
    """Isend a reply (``RowCodec.encode``'s bytes; keep them until the requests complete)."""
    return send_chunks(comm, raw, dest, row_tags(table)[3], chunk_bytes) if raw.size else []


def receive_request(comm: MPI.Comm, table: int, dim: int, rows: int, codec: RowCodec, chunk_bytes: int,
                    timeout: float) -> RowRequest | None:
    """The next request of table ``table`` from any worker, whole (its keys and values are sent
    right behind its header), or None if none has come.

    Raises:
        MalformedMessage: a header or key out of range (``rows``: the shard's rows).
    """
    request, key_tag, value_tag, _ = row_tags(table)
    status = MPI.Status()
    message = comm.improbe(source=MPI.ANY_SOURCE, tag=request, status=status)
    if message is None:
        return None
    source = status.Get_source()
    header = np.empty(3, dtype=np.int64)
    message.Recv([header, MPI.INT64_T])
    kind, step, n = (int(x) for x in header)
    if kind not in (0, 1, 2, 3) or n < 0 or (kind == RowKind.EXPORT and n):
        raise MalformedMessage(f"table {table}: a request [{kind}, {step}, {n}] from rank {source}")
    pushes = kind in (RowKind.PUSH, RowKind.PUSH_PULLED)
    keys = np.empty(n if kind != RowKind.PUSH_PULLED else 0, dtype=np.int64)
    values = codec.buffer(n, dim) if pushes else None
    reqs = recv_chunks(comm, keys, source, key_tag, chunk_bytes) if len(keys) else []
    if values is not None and n:
        reqs += recv_chunks(comm, values, source, value_tag, chunk_bytes)
    wait_all(reqs, f"the keys and rows of table {table}'s request from rank {source}", timeout)
    if len(keys) and (keys.min() < 0 or keys.max() >= rows):
        raise MalformedMessage(f"table {table}: rank {source} named local rows {keys.min()} .. {keys.max()} of"
                               f" a shard of {rows}")
    return RowRequest(source, RowKind(kind), step, torch.from_numpy(keys),
                      codec.decode(values, n, dim) if values is not None else None)

"""Data-server role: read partitions of an HDF5 dataset and stream batches to workers.

Lifecycle, symmetric with the parameter server: ``start()`` opens the file (collectively with
``driver='mpio'`` over the data servers' communicator when h5py has MPI-IO, an independent
read-only open otherwise) and posts one request receive per worker -> ``serve()`` answers
requests until every worker has said it is done -> ``finish()`` completes the sends and closes
the file (collective).

The messages (requests, replies, the done message; their wire format) are
``mpips.transport.batches``: ``BatchResponder`` on the data server, ``BatchRequester`` on the worker.

Workers (``RemoteSource``) keep ``--prefetch`` steps of requests in flight: when step t is
handed to the model, the requests of steps up to t + prefetch are already posted. Which data
server serves which partition comes from ``DataAssignment`` (pure, the same on every rank).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from mpips import faults
from mpips.data import Batch, DatasetHandle, EpochPlan
from mpips.data.assign import DataAssignment
from mpips.data.hdf5 import DatasetFile, PartitionReader, Partitions, SampleFormat
from mpips.data.prepare import has_mpio
from mpips.trace import NULL_TRACER, NullTracer, Tracer
from mpips.transport import Backoff, StallError
from mpips.transport.batches import BatchRequester, BatchResponder, PostedBatch

__all__ = ["DataServer", "DataServerStats", "RemoteSource", "run_data_server"]

log = logging.getLogger("mpips.dataserver")

@dataclass
class DataServerStats:
    requests: int = 0
    samples: int = 0
    bytes_sent: int = 0
    bytes_read: int = 0
    reads: int = 0
    read_seconds: float = 0.0
    serve_seconds: float = 0.0  # from the first request to the last done
    per_worker: list[int] = field(default_factory=list)


class DataServer:
    """Data server ``index``: serves sample requests of ``workers`` from the partitions it holds.

    Args:
        comm: communicator shared with the workers (the world).
        servers: the data servers' own communicator (for the collective MPI-IO open).
        index: this data server's index.
        workers: the workers' ranks in ``comm``, by worker index.
        path: the dataset file.
        held: partitions this server holds; a request outside them is a routing bug (error).
        max_ids: the largest request (the per-worker batch size).
        cache_bytes: bound of the partition read cache.
        stall_timeout: seconds without any request before giving up (StallError).
        mpio: open with the MPI-IO driver (default: when h5py has it).
        data: the opened dataset, whose ``open_file`` reads HDF5 files in place (``path`` unused).

    ``tracer`` (an attribute, set after construction; ``mpips.trace``) records reading, serving
    and waiting for requests.
    """

    tracer: Tracer | NullTracer = NULL_TRACER

    def __init__(
        self,
        *,
        comm: MPI.Comm,
        servers: MPI.Comm,
        index: int,
        workers: list[int],
        path: str,
        held: list[int],
        max_ids: int,
        cache_bytes: int,
        stall_timeout: float,
        mpio: bool | None = None,
        data: DatasetHandle | None = None,
    ):
        self.comm, self.servers, self.index, self.workers = comm, servers, index, workers
        self.path, self.held, self.max_ids = path, set(held), max_ids
        self.cache_bytes, self.stall_timeout = cache_bytes, stall_timeout
        self.mpio = has_mpio() if mpio is None else mpio
        self.data = data
        self.stats = DataServerStats(per_worker=[0] * len(workers))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Collective over ``servers`` (with MPI-IO): open the file, post the request receives."""
        mpio = self.servers if self.mpio else None
        self.file = self.data.open_file(mpio) if self.data is not None else DatasetFile(self.path, comm=mpio)
        self.reader = PartitionReader(self.file, self.cache_bytes)
        self.format: SampleFormat = self.file.format
        self.partitions: Partitions = self.file.partitions
        self.port = BatchResponder(self.comm, self.workers, self.max_ids, f"data server {self.index}")
        self.done = [False] * len(self.workers)

    def serve(self) -> DataServerStats:
        """Answer requests until every worker is done; StallError if none come for too long."""
        backoff, last = Backoff(high=1e-3), time.monotonic()
        first = None
        tracer = self.tracer
        while not all(self.done):
            began = tracer.now()
            ready = self.port.poll()
            for w in ready:
                first = first if first is not None else time.perf_counter()
                with tracer.span("serve"):
                    self._handle(w)
            self.port.progress()
            if ready:
                backoff.reset()
                last = time.monotonic()
            elif time.monotonic() - last > self.stall_timeout:
                waiting = [w for w, d in enumerate(self.done) if not d]
                raise StallError(
                    f"data server {self.index}: no request for {self.stall_timeout:.0f} s;"
                    f" still waiting for workers {waiting}"
                )
            else:
                backoff.wait()
                tracer.idle("wait for requests", began)
        if first is not None:
            self.stats.serve_seconds = time.perf_counter() - first
        return self.stats

    def finish(self) -> DataServerStats:
        """Complete the outstanding sends, then close the file (collective with MPI-IO)."""
        self.port.close(self.stall_timeout)
        self.stats.bytes_read, self.stats.reads = (
            self.reader.stats.bytes_read,
            self.reader.stats.reads,
        )
        self.file.close()
        return self.stats

    # -- requests ----------------------------------------------------------------------------
    def _handle(self, w: int) -> None:
        request = self.port.take(w)
        if request.done:
            self.done[w] = True
            return
        faults.at("data", request.step)  # the step within the epoch
        ids, n = request.ids, len(request.ids)
        self.port.repost(w)  # the next request may land while we read
        wrong = set(np.unique(self.partitions.of(ids)).tolist()) - self.held
        if wrong:
            raise RuntimeError(
                f"data server {self.index}: worker {w} asked for partitions {sorted(wrong)},"
                " which it does not hold"
            )
        t0 = time.perf_counter()
        reply, body = self.port.reply_buffer(n, self.format.record_bytes)
        with self.tracer.span("read"):
            self.reader.take(ids, out=self.format.unpack(body, n))  # read into the reply
        self.stats.read_seconds += time.perf_counter() - t0
        self.port.reply(request, reply)
        st = self.stats
        st.requests += 1
        st.samples += n
        st.bytes_sent += reply.nbytes
        st.per_worker[w] += n


@dataclass
class _Piece:
    server: int
    positions: np.ndarray
    posted: PostedBatch


@dataclass
class _Pending:
    step: int  # global step
    ids: np.ndarray
    pieces: list[_Piece]


class RemoteSource:
    """A worker's BatchSource fed by data servers, ``prefetch`` steps of requests in flight.

    Args:
        comm: communicator shared with the data servers (the world).
        data_servers: their ranks in ``comm``, by data-server index.
        assignment: where this worker reads each partition.
        worker: this worker's index.
        plan: the sample-order contract.
        fmt, partitions: the dataset's sample format and partition table.
        prefetch: steps requested ahead.
        total_steps: the run's last global step + 1 (nothing is requested beyond it).
        stall_timeout: seconds to wait for a batch before StallError.
        context: text window length handed to the model.
    """

    def __init__(
        self,
        *,
        comm: MPI.Comm,
        data_servers: tuple[int, ...],
        assignment: DataAssignment,
        worker: int,
        plan: EpochPlan,
        fmt: SampleFormat,
        partitions: Partitions,
        prefetch: int,
        total_steps: int,
        stall_timeout: float,
        context: int = 0,
    ):
        self.comm, self.data_servers, self.worker, self.plan = comm, data_servers, worker, plan
        self.port = BatchRequester(comm, worker)
        self.route = np.asarray(assignment.route[worker], dtype=np.int64)
        self.format, self.partitions, self.prefetch = fmt, partitions, prefetch
        self.total_steps, self.stall_timeout, self.context = total_steps, stall_timeout, context
        self.pending: list[_Pending] = []
        self.next_step = 0
        self.wait_seconds = 0.0
        self.last_wait = 0.0
        self.closed = False

    @classmethod
    def for_job(
        cls,
        comm: MPI.Comm,
        cfg: Any,
        layout: Any,
        index: int,
        plan: EpochPlan,
        data: DatasetHandle,
        steps: int,
    ) -> RemoteSource:
        assignment = DataAssignment.build(
            data.partitions.sizes, len(layout.data_servers), len(layout.workers), cfg.data.replicas
        )
        return cls(
            comm=comm,
            data_servers=layout.data_servers,
            assignment=assignment,
            worker=index,
            plan=plan,
            fmt=data.format,
            partitions=data.partitions,
            prefetch=cfg.data.prefetch,
            total_steps=steps,
            stall_timeout=cfg.train.stall_timeout,
            context=cfg.model.gpt_context,
        )

    def _post(self, g: int) -> _Pending:
        epoch, step = self.plan.position(g)
        ids = self.plan.worker_ids(epoch, step, self.worker)
        pieces = []
        if len(ids):
            servers = self.route[self.partitions.of(ids)]
            for s in np.unique(servers):
                pos = np.nonzero(servers == s)[0]
                dest = self.data_servers[int(s)]
                posted = self.port.post(dest, epoch, step, ids[pos], self.format.record_bytes)
                pieces.append(_Piece(int(s), pos, posted))
        return _Pending(g, ids, pieces)

    def _top_up(self) -> None:
        while len(self.pending) < self.prefetch and self.next_step < self.total_steps:
            self.pending.append(self._post(self.next_step))
            self.next_step += 1

    def _complete(self, entry: _Pending) -> None:
        self.port.wait(
            [p.posted for p in entry.pieces],
            f"the data servers to send the batch of step {entry.step}",
            self.stall_timeout,
        )

    def batch(self, epoch: int, step: int) -> Batch:
        """The worker's samples of (epoch, step); steps must come in increasing order. A step
        further on than the next one (bsp's backup workers: a late worker skips ahead) first takes
        in, and drops, the batches already asked for the steps in between."""
        g = epoch * self.plan.steps_per_epoch + step
        while self.pending and self.pending[0].step < g:
            self._complete(self.pending.pop(0))
        if self.pending and self.pending[0].step != g:
            raise ValueError(
                f"batches must be asked for in order: expected step {self.pending[0].step}, got {g}"
            )
        if not self.pending:
            self.next_step = g
        self._top_up()
        entry = self.pending.pop(0)
        t0 = time.perf_counter()
        self._complete(entry)
        self.last_wait = time.perf_counter() - t0
        self.wait_seconds += self.last_wait
        self._top_up()  # keep `prefetch` steps in flight while this one is computed
        out = self.format.empty(len(entry.ids)) if len(entry.pieces) != 1 else {}
        for p in entry.pieces:
            body = self.port.samples(p.posted, epoch, step, len(p.positions), p.server)
            arrays = self.format.unpack(body, len(p.positions))
            if len(entry.pieces) == 1:  # the whole batch from one server, in order: no copy
                out = arrays
            else:
                for name, arr in arrays.items():
                    out[name][p.positions] = arr
        x, y = self.format.to_xy(out, self.context)
        return Batch(entry.ids, x, y)

    def close(self) -> None:
        """Receive what is still in flight, then tell every data server this worker is done."""
        if self.closed:
            return
        self.closed = True
        for entry in self.pending:
            self._complete(entry)
        self.pending.clear()
        self.port.done(self.data_servers, self.stall_timeout)


def run_data_server(
    cfg: Any, layout: Any, comms: Any, data: DatasetHandle, epoch_plan: EpochPlan, steps: int,
    tracer: Tracer | NullTracer = NULL_TRACER,
) -> DataServerStats:
    """The data-server role of ``mpips.train``: start, serve until every worker is done, finish."""
    index = layout.index_of(comms.world.Get_rank())
    assignment = DataAssignment.build(
        data.partitions.sizes, len(layout.data_servers), len(layout.workers), cfg.data.replicas
    )
    server = DataServer(
        comm=comms.world,
        servers=comms.role,
        index=index,
        workers=list(layout.workers),
        path=data.path,
        held=assignment.held_by(index),
        max_ids=cfg.data.batch_size,
        cache_bytes=int(cfg.data.cache_mb * (1 << 20)),
        stall_timeout=cfg.train.stall_timeout,
        data=data,
    )
    server.tracer = tracer
    with tracer.span("start-up"):
        server.start()
    stats = server.serve()  # no `finally`: finish() is collective; a failure aborts the job instead
    server.finish()
    log.info(
        "data server %d: %d requests, %d samples, %.1f MB sent, %.1f MB read in %d reads (%.2f s)",
        index,
        stats.requests,
        stats.samples,
        stats.bytes_sent / 1e6,
        stats.bytes_read / 1e6,
        stats.reads,
        stats.read_seconds,
    )
    return stats

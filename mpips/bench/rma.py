"""``rma``: pull bandwidth of mpips' parameter window against raw MPI and the memory limit.

One worker (rank 0) pulls a model of M bytes sharded evenly over S servers (ranks 1..S) with
``ParameterWindow.pull`` -- the code a worker runs every step: one shared lock per server,
request-based ``Rget`` of status block and shard, ``Waitall``, unlock. In the same job, with the
same bytes, it measures:

- ``raw_get``: plain mpi4py over a second ``Win.Create`` window on the same server memory:
  ``Lock_all``, one ``Get`` per server, ``Unlock_all``;
- ``isend``: every server ``Isend``s its shard, the worker ``Irecv``s all and waits;
- ``memcpy``: ``numpy.copyto`` of M bytes inside the worker: the limit on one node.

Bandwidth is M bytes / seconds (bytes moved once, not read + write). Ranks that sit out a
measurement wait in a sleeping barrier, as a parameter server between pushes does.

    mpirun -n 4 python -m mpips.bench rma --sizes 1M,100M,1G --servers 1,3
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from mpi4py import MPI

from mpips.bench.common import (
    BenchError,
    Spread,
    format_table,
    parse_sizes,
    quiet_barrier,
    ratio,
    time_repeated,
)
from mpips.transport import HEADER_BYTES, ParameterWindow

__all__ = ["add_arguments", "format_rows", "run"]

DEFAULT_SIZES = "1M,10M,100M,1G"
METHODS = ("mpips", "raw_get", "isend", "memcpy")
_TAG = 77


def add_arguments(p: argparse.ArgumentParser, sizes: str = DEFAULT_SIZES) -> None:
    g = p.add_argument_group("rma")
    g.add_argument("--sizes", default=sizes,
                   help="model sizes to pull, comma-separated, K/M/G = 1e3/1e6/1e9 bytes")
    g.add_argument("--servers", default=None,
                   help="server counts S, comma-separated (default: 1 and all ranks but one)")


def _reps_for(nbytes: int, reps: int) -> int:
    """More repetitions for small pulls, whose single timings are noisy."""
    return reps * 4 if nbytes < 50_000_000 else reps


def _measure(group: MPI.Comm, servers: int, nbytes: int, reps: int, warmup: int) -> dict | None:
    """One size on ``group`` (rank 0 worker, ranks 1..S servers); the row on rank 0."""
    me = group.Get_rank()
    counts = [len(c) for c in np.array_split(np.arange(nbytes // 4), servers)]
    if me == 0:
        window = ParameterWindow(group, 0)
        raw = MPI.Win.Create(None, 1, comm=group)
        dest = np.zeros(nbytes // 4, dtype=np.float32)
        shards = np.array_split(dest, servers)  # views, as FlatModel.shard gives
        status = np.zeros((servers, HEADER_BYTES // 8), dtype=np.int64)
        scratch = np.empty_like(dest)
        scratch[:] = 0.0  # touch the pages before timing
    else:
        n = counts[me - 1]
        window = ParameterWindow(group, n, init=np.full(n, float(me), dtype=np.float32))
        # the same memory as the published version's shard, in a plain window
        raw = MPI.Win.Create(window.published()[HEADER_BYTES:], 1, comm=group)
    targets = list(range(1, servers + 1))

    def pull() -> None:
        window.pull(targets, status, shards)

    def raw_get() -> None:
        raw.Lock_all()
        for t, shard in zip(targets, shards, strict=True):
            raw.Get(shard, t, (0, shard.size, MPI.FLOAT))
        raw.Unlock_all()

    def isend_recv() -> None:
        reqs = [group.Irecv(shard, source=t, tag=_TAG)
                for t, shard in zip(targets, shards, strict=True)]
        MPI.Request.Waitall(reqs)

    def memcpy() -> None:
        np.copyto(scratch, dest)

    n_reps = _reps_for(nbytes, reps)
    times: dict[str, list[float]] = {}
    for name, op in (("mpips", pull), ("raw_get", raw_get), ("isend", isend_recv),
                     ("memcpy", memcpy)):
        if me == 0:
            times[name] = time_repeated(op, n_reps, warmup, before=lambda: quiet_barrier(group))
            if name == "mpips":
                expect = np.repeat(np.arange(1, servers + 1, dtype=np.float32), counts)
                if not np.array_equal(dest, expect):
                    raise BenchError(f"mpips pull of {nbytes} bytes returned wrong values")
        else:
            for _ in range(warmup + n_reps):
                quiet_barrier(group)
                if name == "isend":
                    group.Isend(window.params, dest=0, tag=_TAG).Wait()
    quiet_barrier(group)
    raw.Free()
    window.free()
    if me != 0:
        return None
    spread = {k: Spread.of(v).scaled(lambda t: nbytes / t / 1e9) for k, v in times.items()}
    gbps = {k: s.median for k, s in spread.items()}
    return {
        "bytes": nbytes,
        "servers": servers,
        "reps": n_reps,
        "warmup": warmup,
        **{f"{k}_gbps": v for k, v in gbps.items()},
        "ratio_vs_raw_get": ratio(gbps["mpips"], gbps["raw_get"]),
        "ratio_vs_isend": ratio(gbps["mpips"], gbps["isend"]),
        "ratio_vs_memcpy": ratio(gbps["mpips"], gbps["memcpy"]),
        "spread": {f"{k}_gbps": s.as_dict() for k, s in spread.items()},
    }


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """All sizes x server counts; the rows on rank 0 (an empty list elsewhere)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if size < 2:
        raise BenchError("rma needs at least 2 ranks (1 worker + 1 server): mpirun -n 2 or more")
    sizes = parse_sizes(args.sizes)
    server_counts = sorted({int(s) for s in args.servers.split(",")}) if args.servers else sorted({1, size - 1})
    bad = [s for s in server_counts if not 1 <= s <= size - 1]
    if bad:
        raise BenchError(f"--servers {bad}: with {size} ranks, S must be 1..{size - 1}")
    rows = []
    for servers in server_counts:
        group = comm.Split(0 if rank <= servers else MPI.UNDEFINED, rank)
        if group != MPI.COMM_NULL:
            for nbytes in sizes:
                row = _measure(group, servers, nbytes, args.reps, args.warmup)
                if row is not None:
                    rows.append(row)
            group.Free()
        quiet_barrier(comm)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    def pm(row: dict, key: str) -> str:
        s = row["spread"][key]
        rel = (s["q3"] - s["q1"]) / 2 / s["median"] * 100 if s["median"] else 0.0
        return f"{s['median']:.2f}±{rel:.0f}%"

    header = ["bytes", "S", "mpips GB/s", "raw Get", "x raw Get", "Isend/Irecv", "x Isend",
              "memcpy", "x memcpy"]
    table = [
        [f"{r['bytes'] / 1e6:g} MB", r["servers"], pm(r, "mpips_gbps"), pm(r, "raw_get_gbps"),
         r["ratio_vs_raw_get"], pm(r, "isend_gbps"), r["ratio_vs_isend"], pm(r, "memcpy_gbps"),
         r["ratio_vs_memcpy"]]
        for r in rows
    ]
    return format_table("rma: pull of M bytes from S servers into one worker (median ± IQR/2)",
                        header, table)

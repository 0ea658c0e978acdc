"""``python -m mpips.bench data``: data-server throughput next to a raw h5py read and the workers.

    mpirun -n 3 python -m mpips.bench data                      # 1 data server, 2 workers
    mpirun -n 6 python -m mpips.bench data --data-servers 2 --replicas 2 --file big.h5

Three figures from one job, over the same file (made with ``mpips.data synth`` unless
``--file`` is given; the raw read runs first, so both it and the data servers read from a warm
page cache when the file fits in memory):

- raw: one rank reads the training split sequentially with h5py in 64 MB slabs (MB/s).
- data servers: the real DataServer / RemoteSource pair streams ``--epochs`` epochs of the
  partition-aware order to the workers; samples/s and MB/s summed over the data servers.
- workers: samples/s the workers receive, with ``--compute-ms`` of simulated work per step,
  and the mean time a step waited for its batch.

Ratios: data servers / raw, workers / data servers. ``main`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from mpips.bench.common import BenchError
from mpips.data import EpochPlan
from mpips.data.assign import DataAssignment
from mpips.data.hdf5 import DatasetFile, SampleFormat
from mpips.data.prepare import SynthSource, split_ids, write_dataset

__all__ = ["main"]

SLAB = 64 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpips.bench data", description=__doc__.split("\n")[0]
    )
    p.add_argument("--file", help="dataset file (default: a synthetic one in a temporary folder)")
    p.add_argument("--size-mb", type=float, default=256.0, help="size of the synthetic file")
    p.add_argument("--shape", default="3,32,32", help="sample shape of the synthetic file")
    p.add_argument("--partitions", type=int, default=16, help="partitions of the synthetic file")
    p.add_argument(
        "--data-servers", type=int, default=1, help="data-server ranks; the rest are workers"
    )
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256, help="samples per worker per step")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--cache-mb", type=float, default=256.0, help="data-server cache bound")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--compute-ms", type=float, default=0.0, help="simulated work per worker step")
    p.add_argument("--json", help="also write the figures to this file (rank 0)")
    return p


def _synth(args: argparse.Namespace) -> str:
    shape = tuple(int(v) for v in args.shape.split(","))
    fmt = SampleFormat.classification(shape, np.float32, 10)
    n = max(args.partitions, int(args.size_mb * (1 << 20) / fmt.record_bytes))
    train, val = split_ids(n, 0.01, 0, False)
    path = os.path.join(tempfile.mkdtemp(prefix="mpips-bench-data-"), "synth.h5")
    write_dataset(SynthSource("synth", fmt, train, val), path, partitions=args.partitions)
    return path


def _raw_read(path: str) -> tuple[float, int]:
    """Seconds and bytes for a sequential read of every training field, slab by slab."""
    with DatasetFile(path) as f:
        t0, total = time.perf_counter(), 0
        rows = max(1, SLAB // f.format.record_bytes)
        for lo in range(0, f.samples, rows):
            for arr in f.read_train(lo, min(f.samples, lo + rows)).values():
                total += arr.nbytes
        return time.perf_counter() - t0, total


def run(args: argparse.Namespace, comm: MPI.Comm) -> dict[str, Any]:
    from mpips.dataserver import DataServer, RemoteSource

    rank, size = comm.Get_rank(), comm.Get_size()
    d = args.data_servers
    if not 1 <= d < size:
        raise BenchError(f"{size} ranks cannot hold {d} data servers and at least one worker")
    made = None
    if args.file is None:
        made = _synth(args) if rank == 0 else None
    path = comm.bcast(made, root=0) if args.file is None else args.file
    with DatasetFile(path) as f:
        fmt, parts, n = f.format, f.partitions, f.samples
    raw = _raw_read(path) if rank == 0 else None
    workers = size - d
    plan = EpochPlan(n, workers, args.batch_size, seed=0, partitions=parts.sizes)
    steps = args.epochs * plan.steps_per_epoch
    assign = DataAssignment.build(parts.sizes, d, workers, args.replicas)
    sub = comm.Split(0 if rank < d else 1, rank)
    comm.Barrier()
    t0 = time.perf_counter()
    mine: dict[str, float] = {}
    if rank < d:
        server = DataServer(
            comm=comm,
            servers=sub,
            index=rank,
            workers=list(range(d, size)),
            path=path,
            held=assign.held_by(rank),
            max_ids=args.batch_size,
            cache_bytes=int(args.cache_mb * (1 << 20)),
            stall_timeout=120,
        )
        server.start()
        stats = server.serve()
        server.finish()
        mine = {
            "served": stats.samples,
            "bytes": stats.bytes_sent,
            "seconds": stats.serve_seconds,
            "read_bytes": stats.bytes_read,
        }
    else:
        source = RemoteSource(
            comm=comm,
            data_servers=tuple(range(d)),
            assignment=assign,
            worker=rank - d,
            plan=plan,
            fmt=fmt,
            partitions=parts,
            prefetch=args.prefetch,
            total_steps=steps,
            stall_timeout=120,
        )
        got = 0
        for g in range(steps):
            got += len(source.batch(*plan.position(g)))
            if args.compute_ms:
                time.sleep(args.compute_ms / 1e3)
        source.close()
        mine = {
            "received": got,
            "seconds": time.perf_counter() - t0,
            "wait": source.wait_seconds,
            "steps": steps,
        }
    sub.Free()
    everyone = comm.gather(mine, root=0)
    comm.Barrier()
    if made is not None:
        shutil.rmtree(os.path.dirname(made), ignore_errors=True)
    if rank != 0:
        return {}
    servers, clients = everyone[:d], everyone[d:]
    raw_s, raw_bytes = raw
    served = sum(s["served"] for s in servers)
    server_s = max(s["seconds"] for s in servers)
    worker_s = max(c["seconds"] for c in clients)
    received = sum(c["received"] for c in clients)
    record = fmt.record_bytes
    out = {
        "file": path if made is None else "synthetic",
        "samples": n,
        "record_bytes": record,
        "partitions": len(parts),
        "data_servers": d,
        "workers": workers,
        "replicas": args.replicas,
        "batch_size": args.batch_size,
        "prefetch": args.prefetch,
        "epochs": args.epochs,
        "raw_samples_per_s": raw_bytes / record / raw_s,
        "raw_mb_per_s": raw_bytes / 1e6 / raw_s,
        "server_samples_per_s": served / server_s,
        "server_mb_per_s": served * record / 1e6 / server_s,
        "worker_samples_per_s": received / worker_s,
        "worker_mb_per_s": received * record / 1e6 / worker_s,
        "data_wait_per_step_s": sum(c["wait"] for c in clients) / sum(c["steps"] for c in clients),
        "bytes_read_by_servers": sum(s["read_bytes"] for s in servers),
    }
    out["server_over_raw"] = out["server_samples_per_s"] / out["raw_samples_per_s"]
    out["workers_over_server"] = out["worker_samples_per_s"] / out["server_samples_per_s"]
    return out


def _row(name: str, rate: float, mb: float, ratio: float, of: str) -> str:
    return f"{name:<28} {rate:>12.0f} {mb:>10.1f} {ratio:>8.2f}{of}"


def format_result(r: dict[str, Any]) -> str:
    lines = [
        f"data: {r['samples']} samples x {r['record_bytes']} B in {r['partitions']} partitions;"
        f" {r['data_servers']} data servers (replicas {r['replicas']}), {r['workers']} workers,"
        f" batch {r['batch_size']}, prefetch {r['prefetch']}, {r['epochs']} epoch(s)",
        f"{'':<28} {'samples/s':>12} {'MB/s':>10} {'ratio':>8}",
        _row("raw h5py sequential read", r["raw_samples_per_s"], r["raw_mb_per_s"], 1.0, ""),
        _row(
            "data servers (sum)",
            r["server_samples_per_s"],
            r["server_mb_per_s"],
            r["server_over_raw"],
            "  (of raw)",
        ),
        _row(
            "workers receive (sum)",
            r["worker_samples_per_s"],
            r["worker_mb_per_s"],
            r["workers_over_server"],
            "  (of data servers)",
        ),
        f"mean wait for data per worker step: {1e3 * r['data_wait_per_step_s']:.2f} ms;"
        f" data servers read {r['bytes_read_by_servers'] / 1e6:.1f} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Run under mpirun; rank 0 prints the table and returns the figures (others: {})."""
    import json

    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    result = run(args, comm)
    if comm.Get_rank() == 0:
        print(format_result(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result

"""``mpirun -n 4 python -m mpips.bench sparse``: a sparse table on the servers against its baselines.

One model (``mpips.models.DLRM``: ``--sparse-fields`` ids into one table of ``--sparse-keys``
rows of ``--sparse-dim``, Zipf ids from ``mpips.data.clicks``, Adagrad on everything), three
systems, the same samples per step:

- ``torch-sparse``: one torch process (rank 0), ``nn.Embedding(sparse=True)``, the W workers'
  batches concatenated (baseline (a));
- ``mpips-sparse``: ``job.embedding`` on the servers (the ranks beyond the W workers), each
  worker pulling and pushing only the rows its batch touches;
- ``mpips-dense``: the same table as a plain ``nn.Embedding`` through ``job.optimizer``: every
  worker pulls and pushes the whole table every step (baseline (b)).

Rows (``"sparse"`` in the JSON): ``system``, ``workers``, ``samples_per_s`` (median of
``--reps`` runs; ``min_samples_per_s``, ``max_samples_per_s``), ``ratio_vs_torch``,
``ratio_vs_dense``, and per worker and step: ``unique_rows``, ``sparse_bytes`` (table
requests, keys and rows, both ways), ``dense_bytes`` (the dense parameters' pulls and
pushes), ``bytes_per_step`` (both), ``bound`` = 2 x unique rows x (row bytes + 8 key bytes) +
dense bytes, ``ratio_to_bound``, and ``bytes_per_row`` (sparse bytes per unique row; a row is
``4 * dim`` bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpips.bench.common import BenchError, format_table, quiet_barrier, ratio
from mpips.data.clicks import ClickRule
from mpips.models import DLRM
from mpips.sparse import quiet_sparse

__all__ = ["add_arguments", "format_rows", "run"]

SYSTEMS = ("torch-sparse", "mpips-sparse", "mpips-dense")
LR = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sparse")
    g.add_argument("--sparse-keys", type=int, default=200_000, help="table rows (the dense path moves all of them)")
    g.add_argument("--sparse-dim", type=int, default=16, help="row width")
    g.add_argument("--sparse-fields", type=int, default=4, help="ids per sample")
    g.add_argument("--sparse-batch", type=int, default=256, help="samples per worker and step")
    g.add_argument("--sparse-steps", type=int, default=40, help="timed steps per run (after 5 untimed)")


def _batches(args: argparse.Namespace, workers: int, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]]]:
    """[step][worker] -> (ids, dense, label): the same samples for every system."""
    rule = ClickRule(args.sparse_keys - args.sparse_keys % args.sparse_fields, args.sparse_fields, 4, 1.1, 0)
    out = []
    for step in range(steps):
        row = []
        for w in range(workers):
            ((ids, dense, label, _),) = rule.samples(args.sparse_batch, 1000 * step + w)
            row.append((torch.from_numpy(ids), torch.from_numpy(dense), torch.from_numpy(label)))
        out.append(row)
    return out


def _torch(args: argparse.Namespace, batches) -> tuple[float, dict[str, float]]:
    quiet_sparse()
    torch.manual_seed(0)
    model = DLRM(nn.Embedding(args.sparse_keys, args.sparse_dim, sparse=True), args.sparse_fields, 4, args.sparse_dim)
    opt = torch.optim.Adagrad(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    t0 = 0.0
    for step, row in enumerate(batches):
        if step == 5:
            t0 = time.perf_counter()
        ids, dense, label = (torch.cat(t) for t in zip(*row, strict=True))
        opt.zero_grad()
        loss_fn(model(ids, dense), label).backward()
        opt.step()
    return time.perf_counter() - t0, {}


def _mpips(args: argparse.Namespace, comm: MPI.Comm, batches, workers: int, sparse: bool) -> tuple[float, dict]:
    import mpips

    with contextlib.redirect_stdout(io.StringIO()):  # the role map
        job = mpips.init(comm.Get_size() - workers, 0, "bsp", config={"stall_timeout": 120}, comm=comm,
                         handle_signals=False)
    if not job.is_worker:
        job.serve()
        return 0.0, {}
    torch.manual_seed(0)
    emb = job.embedding(args.sparse_keys, args.sparse_dim, optimizer=torch.optim.Adagrad, lr=LR, init_std=0.01) \
        if sparse else nn.Embedding(args.sparse_keys, args.sparse_dim)
    model = DLRM(emb, args.sparse_fields, 4, args.sparse_dim)
    opt = job.optimizer(model, torch.optim.Adagrad, lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    t0, unique, moved = 0.0, 0, [0, 0]
    for step, row in enumerate(batches):
        ids, dense, label = row[job.worker_index]
        if step == 5:
            t0 = time.perf_counter()
            moved = _moved(opt, emb if sparse else None)
        if step >= 5:
            unique += len(ids.unique())
        opt.zero_grad()
        loss_fn(model(ids, dense), label).backward()
        if sparse and step + 1 < len(batches):
            emb.prefetch(batches[step + 1][job.worker_index][0])
        opt.step()
    seconds = time.perf_counter() - t0
    after = _moved(opt, emb if sparse else None)
    job.finish()
    steps = len(batches) - 5
    return seconds, {"unique_rows": unique / steps, "sparse_bytes": (after[0] - moved[0]) / steps,
                     "dense_bytes": (after[1] - moved[1]) / steps}


def _moved(opt: Any, emb: Any) -> list[int]:
    """[table bytes, dense bytes] this worker moved so far."""
    stats = opt._client.stats  # noqa: SLF001 - the bench reads the client's counters
    table = emb.client.bytes_pulled + emb.client.bytes_pushed if emb is not None else 0
    return [table, stats.bytes_pulled + stats.bytes_pushed]


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    size = comm.Get_size()
    if size < 3:
        raise BenchError("sparse needs at least 3 ranks: servers and 2 workers")
    workers = 2
    steps = 5 + args.sparse_steps
    batches = _batches(args, workers, steps)
    samples = args.sparse_batch * workers * args.sparse_steps
    rows = []
    for system in SYSTEMS:
        times, bytes_ = [], []
        for _ in range(max(1, args.reps)):
            quiet_barrier(comm)
            if system == "torch-sparse":
                seconds, moved = _torch(args, batches) if comm.Get_rank() == 0 else (0.0, {})
            else:
                seconds, moved = _mpips(args, comm, batches, workers, system == "mpips-sparse")
            gathered = comm.gather((seconds, moved), root=0)
            if comm.Get_rank() == 0:
                times.append(max(s for s, _ in gathered))
                bytes_ += [m for _, m in gathered if m]
        if comm.Get_rank() == 0:
            rows.append(_row(args, system, workers, samples, times, bytes_))
    if comm.Get_rank() != 0:
        return []
    by = {r["system"]: r["samples_per_s"] for r in rows}
    for r in rows:
        r["ratio_vs_torch"] = ratio(r["samples_per_s"], by["torch-sparse"])
        r["ratio_vs_dense"] = ratio(r["samples_per_s"], by["mpips-dense"])
    return rows


def _row(args, system: str, workers: int, samples: int, times: list[float], moved: list[dict]) -> dict[str, Any]:
    rates = [samples / t for t in times]
    row: dict[str, Any] = {"system": system, "workers": workers if system != "torch-sparse" else 1,
                           "keys": args.sparse_keys, "dim": args.sparse_dim, "batch": args.sparse_batch,
                           "samples_per_s": statistics.median(rates), "min_samples_per_s": min(rates),
                           "max_samples_per_s": max(rates)}
    if moved:
        mean = {k: float(np.mean([m[k] for m in moved])) for k in moved[0]}
        row.update(mean)
        row["bytes_per_step"] = mean["sparse_bytes"] + mean["dense_bytes"]
        row["bound"] = 2 * mean["unique_rows"] * (4 * args.sparse_dim + 8) + mean["dense_bytes"]
        row["ratio_to_bound"] = row["bytes_per_step"] / row["bound"]
        row["bytes_per_row"] = mean["sparse_bytes"] / mean["unique_rows"] if mean["sparse_bytes"] else None
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ["system", "W", "samples/s", "spread", "x torch", "x dense", "unique rows", "bytes/step", "x bound",
              "bytes/row"]
    body = [[r["system"], r["workers"], r["samples_per_s"],
             f"{r['min_samples_per_s']:.0f}-{r['max_samples_per_s']:.0f}",
             r.get("ratio_vs_torch"), r.get("ratio_vs_dense"), r.get("unique_rows"), r.get("bytes_per_step"),
             r.get("ratio_to_bound"), r.get("bytes_per_row")] for r in rows]
    return format_table(f"sparse table: {rows[0]['keys']:,} x {rows[0]['dim']} rows, batch {rows[0]['batch']} per"
                        " worker (bytes per worker and step; x bound: bytes / (2 x unique rows x (row + key"
                        " bytes) + dense bytes))", header, body)

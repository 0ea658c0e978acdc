"""``apply``: server-side optimizer throughput against the memory bandwidth of a plain copy.

Rank 0 alone measures (the others wait in a sleeping barrier), all in one process:

- ``copy``: ``numpy.copyto`` of the shard (bytes touched = read + write = 2 x shard bytes);
- ``step``: ``optimizer.step()`` of ``mpips.optim.build_optimizer`` over one flat float32 shard
  with its gradient set -- the update a server applies -- for sgd, momentum and adam;
- ``server`` (2 ranks or more): the per-push path of a ``ParameterServer`` (asp): copy the
  gradient out of the receive buffer, finiteness check, scaling, lr schedule, exclusive window
  epoch, step.

Bytes touched per step count every array the update must read or write once: sgd reads p, g
and writes p (3 x 4 bytes per parameter); momentum adds its buffer (5 x); adam its two moments
(7 x). A step at memory speed would reach ``copy`` GB/s on that count.

    mpirun -n 1 python -m mpips.bench apply --params 64M
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips.bench.common import BenchError, Spread, format_table, parse_names, quiet_barrier, ratio, time_repeated
from mpips.config import OptimConfig
from mpips.optim import build_optimizer

__all__ = ["TOUCHED", "add_arguments", "format_rows", "run"]

# float32 arrays read or written once per step, per parameter element
TOUCHED = {"sgd": 3, "momentum": 5, "nesterov": 5, "adam": 7, "adamw": 7}


def add_arguments(p: argparse.ArgumentParser, params: str = "16M") -> None:
    g = p.add_argument_group("apply")
    g.add_argument("--params", default=params,
                   help="shard size in parameters (K/M suffix = 1e3/1e6)")
    g.add_argument("--optimizers", default="sgd,momentum,adam",
                   help="optimizers to time, comma-separated")


def _count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    try:
        n = int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise BenchError(f"--params {text!r}: expected a count such as 4M") from None
    if n < 1:
        raise BenchError("--params must be at least 1")
    return n


def _step_times(kind: str, n: int, reps: int, warmup: int) -> list[float]:
    param = torch.from_numpy(np.ones(n, dtype=np.float32)).requires_grad_(True)
    param.grad = torch.full_like(param, 1e-3)
    opt = build_optimizer([param], OptimConfig(optimizer=kind, lr=1e-3))
    return time_repeated(opt.step, reps, warmup)  # the first (warm-up) step allocates the state


def _server_times(group: MPI.Comm, kind: str, n: int, reps: int, warmup: int) -> list[float]:
    """The per-push path of a real ParameterServer (asp) on rank 0 of ``group``.

    Collective over ``group`` (2 ranks: Open MPI 4.1 cannot create a window on a one-rank
    communicator); rank 1 plays the silent worker and returns an empty list.
    """
    from mpips.config import TrainConfig
    from mpips.layout import PSContext
    from mpips.server import ParameterServer
    from mpips.shard import ShardPlan
    from mpips.transport import Codec, ParameterWindow, PushHeader

    if group.Get_rank() != 0:
        window = ParameterWindow(group, 0)
        quiet_barrier(group)
        window.free()
        return []
    ctx = PSContext(comm=group, servers=[0], workers=[1], plan=ShardPlan.build([("w", (n,))], 1),
                    train=TrainConfig(sync="asp", stall_timeout=60.0), optim=OptimConfig(optimizer=kind, lr=1e-3),
                    pull="rma", total_steps=2**40)
    server = ParameterServer(ctx, 0, np.ones(n, dtype=np.float32), MPI.COMM_SELF, batch_size=1)
    server.start()
    server.begin_serving()
    payload = np.concatenate([np.full(n, 1e-3, dtype=np.float32).view(np.uint8), np.ones(1, np.uint8)])
    step = [0]

    def one_push() -> None:
        header = PushHeader(step=step[0], worker=0, codec=Codec.RAW32, samples=1,
                            clock_seen=step[0], length=payload.nbytes, grad_norm=1.0, loss=0.0)
        grad, mask = server._decode(header, payload)  # noqa: SLF001 - timing the server's own path
        server.mode.apply_push(server, 0, header, grad, mask)
        step[0] += 1

    try:
        return time_repeated(one_push, reps, warmup)
    finally:
        server.receiver.cancel()
        quiet_barrier(group)
        server.window.free()


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """Rows (one per optimizer) on rank 0; an empty list elsewhere.

    With one rank the server-path columns are left out (None): see ``_server_times``.
    """
    n = _count(args.params)
    kinds = parse_names(args.optimizers, "--optimizers", TOUCHED)
    rank = comm.Get_rank()
    group = comm.Split(0 if rank < 2 else MPI.UNDEFINED, rank) if comm.Get_size() > 1 else None
    rows: list[dict[str, Any]] = []
    if rank == 0:
        src = np.random.default_rng(0).random(n, dtype=np.float32)
        dst = np.zeros_like(src)
        copy = Spread.of(time_repeated(lambda: np.copyto(dst, src), args.reps, args.warmup))
        copy_gbps = copy.scaled(lambda t: 2 * 4 * n / t / 1e9)
        del src, dst
    for kind in kinds:
        server = None
        if group is not None and group != MPI.COMM_NULL:
            times = _server_times(group, kind, n, args.reps, args.warmup)
            server = Spread.of(times) if times else None
        if rank != 0:
            continue
        touched = TOUCHED[kind] * 4 * n
        step = Spread.of(_step_times(kind, n, args.reps, args.warmup))
        gbps = step.scaled(lambda t, b=touched: b / t / 1e9)
        server_gbps = touched / server.median / 1e9 if server else None
        rows.append({
            "optimizer": kind,
            "params": n,
            "bytes_touched_per_step": touched,
            "params_per_s": n / step.median,
            "gbps_touched": gbps.median,
            "copy_gbps": copy_gbps.median,
            "ratio_vs_copy": ratio(gbps.median, copy_gbps.median),
            "server_params_per_s": n / server.median if server else None,
            "server_gbps_touched": server_gbps,
            "server_ratio_vs_copy": ratio(server_gbps, copy_gbps.median),
            "reps": args.reps,
            "warmup": args.warmup,
            "spread": {"step_seconds": step.as_dict(), "copy_gbps": copy_gbps.as_dict(),
                       "gbps_touched": gbps.as_dict(),
                       "server_seconds": server.as_dict() if server else None},
        })
    if group is not None and group != MPI.COMM_NULL:
        group.Free()
    quiet_barrier(comm)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ["optimizer", "params", "Mparams/s", "GB/s touched", "copy GB/s", "x copy",
              "server path Mparams/s", "server x copy"]
    table = [
        [r["optimizer"], f"{r['params'] / 1e6:g}M", r["params_per_s"] / 1e6, r["gbps_touched"],
         r["copy_gbps"], r["ratio_vs_copy"],
         r["server_params_per_s"] and r["server_params_per_s"] / 1e6, r["server_ratio_vs_copy"]]
        for r in rows
    ]
    return format_table("apply: server-side optimizer step over one flat shard (medians;"
                        " copy counts read + write)", header, table)

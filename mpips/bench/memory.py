"""``memory``: peak resident memory of each role of a real mpips run, above a bare process.

One mpips job (``mpips.train.run``: 1 parameter server and ``--workers`` workers, no data
servers) per optimizer, on an MLP of ``--params`` parameters over the digits data, for a few
steps. On every rank, after the imports and the dataset are in memory (what a bare process with
the same imports holds), the peak resident set (Linux ``VmHWM``) is reset through
``/proc/self/clear_refs`` and the resident set read (``baseline_rss_bytes``); after the run the
peak is read (``peak_rss_bytes``). ``bytes_per_param`` = (peak - baseline) / parameters, for a
server per parameter of its shard. Next to it, ``expected_bytes_per_param`` counts the buffers
the engine keeps (``mpips.memory``).

JSON rows under ``"memory"``: role, rank, optimizer, params, workers, peak_rss_bytes,
baseline_rss_bytes, bytes_per_param, expected_bytes_per_param.

    mpirun -n 3 python -m mpips.bench memory --mem-params 50M --mem-optimizers adam,sgd
"""

from __future__ import annotations

import argparse
import gc
import math
from typing import Any

from mpi4py import MPI

from mpips.bench.common import BenchError, format_table, parse_names, parse_sizes, run_quietly
from mpips.config import parse_args
from mpips.data import open_dataset
from mpips.delay import lookahead_lead
from mpips.layout import RoleLayout
from mpips.memory import expected_bytes_per_param
from mpips.optim import STATE_FACTOR

__all__ = ["add_arguments", "format_rows", "run"]

INPUTS, CLASSES = 64, 10  # the digits data: 8x8 images, 10 classes


def add_arguments(p: argparse.ArgumentParser, params: str = "50M") -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--mem-params", default=params, help="MLP parameters (about; K/M/G suffixes)")
    g.add_argument("--mem-optimizers", default="adam,sgd",
                   help="server optimizers, one job each (comma-separated)")
    g.add_argument("--mem-steps", type=int, default=3, help="training steps per job")


def hidden_for(params: int) -> int:
    """MLP hidden width h with about ``params`` parameters (64-h-h-10: h*h + 76*h + 10 of them)."""
    return max(1, int((-76 + math.sqrt(76 * 76 + 4 * max(0, params - 10))) / 2))


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/self/status has no {field}: the memory benchmark needs Linux")


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise BenchError(f"cannot reset the peak RSS (/proc/self/clear_refs: {exc.strerror})") from exc
    return _kib("VmRSS")


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """Rows (one per rank and optimizer) on rank 0; an empty list elsewhere."""
    size = comm.Get_size()
    if size < 2:
        raise BenchError("memory needs at least 2 ranks: 1 parameter server and 1 worker")
    (target,) = parse_sizes(str(args.mem_params))
    hidden = hidden_for(target)
    params = hidden * hidden + 76 * hidden + CLASSES
    open_dataset("digits", None, comm=comm)  # in the baseline: materialised and read once
    rows: list[dict[str, Any]] = []
    for optimizer in parse_names(args.mem_optimizers, "--mem-optimizers", STATE_FACTOR):
        cfg = parse_args([
            "--model", "mlp", "--hidden", str(hidden), "--servers", "1", "--data-servers", "0",
            "--steps", str(args.mem_steps), "--optimizer", optimizer, "--batch-size", "32",
            "--threads", str(args.threads), "--log-every", str(10**9), "--no-final-eval",
        ])
        gc.collect()
        baseline = _reset_peak()
        run_quietly(cfg, comm)
        peak = _kib("VmHWM")
        layout = RoleLayout.from_counts(size, 1, 0, comm.allgather(MPI.Get_processor_name()))
        role = layout.role_of(comm.Get_rank()).value
        workers = size - 1
        largest = hidden * hidden / params  # the MLP's hidden-to-hidden weight
        expected = expected_bytes_per_param(role, optimizer, workers, cfg.train.max_inflight, cfg.train.sync,
                                            cfg.optim.weight_decay, largest, cfg.compression.pull_codec,
                                            lookahead_lead(cfg.optim.lookahead, cfg.train.sync, workers) > 0)["total"]
        mine = {"role": role, "rank": comm.Get_rank(), "optimizer": optimizer, "params": params,
                "workers": workers, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                "bytes_per_param": (peak - baseline) / params,
                "expected_bytes_per_param": expected}
        gathered = comm.gather(mine, root=0)
        if comm.Get_rank() == 0:
            rows += gathered
            print(format_rows(gathered), flush=True)  # as each job ends
        gc.collect()
    return rows if comm.Get_rank() == 0 else []


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ["optimizer", "role", "rank", "params", "W", "peak MiB", "baseline MiB", "bytes/param",
              "expected"]
    table = [[r["optimizer"], r["role"], r["rank"], f"{r['params'] / 1e6:.1f}M", r["workers"],
              r["peak_rss_bytes"] / 2**20, r["baseline_rss_bytes"] / 2**20, r["bytes_per_param"],
              r["expected_bytes_per_param"]] for r in rows]
    return format_table("memory: peak RSS above a bare process with the same imports, per parameter"
                        " (a server's: per parameter of its shard)", header, table)

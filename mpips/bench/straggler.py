"""``straggler``: time to a held-out target with one worker slowed, bsp against asynchrony and backup workers.

For every worker count W the ranks allow (W workers + 1 parameter server, ``--data-servers 0``),
every slow factor f and every system, in one mpirun job and on its first W + 1 ranks,
``mpips.train.run`` trains the digits MLP, repetition r with seed ``--seed`` + r (its initial
parameters and sample order; the same for every system, so the median is over trajectories as
well as timings), with the last worker's forward and backward made f times slower: it sleeps
f - 1 times each step's measured compute (``MPIPS_SLOW_WORKER``,
``mpips.worker.slow_factor``). Every worker's step also takes ``--device-ms`` (20) of device time,
a sleep that stands for an accelerator's kernels (``MPIPS_DEVICE_MS``), so a worker's step is
dominated by its own device and not by the host's cores, which W + 1 ranks share on a small host
(0: CPU compute only); the slow worker's device time is f times as long. Worker 0, never the slow
one, evaluates on the held-out split every ``--eval-every`` steps (with ``--lookahead``, the
optimizer's own values, fetched from the servers for it, and that time counts). The systems:

- ``mpips-bsp``: every step waits for every worker;
- ``mpips-bsp-backup1``: bsp with ``--backup-workers 1``: a step takes the first W - 1 pushes;
- ``mpips-asp``, ``mpips-ssp``: asynchronous, with the default rules: ``lr / W`` divided by the
  staleness (``--staleness-lr``), workers pull the parameters led along the last update by
  ``--lookahead 2`` x (W - 1) updates; a worker's pull waits for the servers' acks of its own pushes;
- ``mpips-asp-no-lookahead``, ``mpips-ssp-no-lookahead``: ``--lookahead 0 --implicit-momentum``
  (Adam's beta1 less the momentum asynchrony adds, 1 - 1/W: the default rules before the look-ahead);
- ``mpips-asp-im``: asp with the look-ahead and ``--implicit-momentum``;
- ``mpips-asp-lookahead1``: asp with ``--lookahead 1`` (led by W - 1 updates, the staleness itself);
- ``mpips-asp-plain``: asp with ``--no-staleness-lr`` (``lr / W`` whatever the staleness);
- ``mpips-asp-dc``: asp with ``--dc-lambda 2`` (delay-compensated, DC-ASGD-a, ``mpips.delay``).

A row per (system, W, f): ``time_to_target_s``, the median over ``--reps`` runs of the seconds
from the end of worker 0's first step to the first evaluation at or above ``--target-accuracy``
(None where no run reached it: ``reached_target`` counts them); ``time_to_loss_target_s``, the
same for the mean of worker 0's last 5 training losses at or below ``--target-loss``;
``final_metric``, the median held-out accuracy of the final model; ``ratio_vs_bsp``, the time to
target over bsp's at the same W and f, in the same job; ``late``, bsp's dropped late pushes.

    mpirun -n 4 python -m mpips.bench straggler --workers 2,3 --slow 1.0,1.5,2.0,4.0 --reps 3 --json F
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips.bench.common import BenchError, format_table, parse_names, quiet_barrier, ratio, run_quietly
from mpips.config import Config, parse_args

__all__ = ["SYSTEMS", "add_arguments", "format_rows", "run"]

SYSTEMS: dict[str, list[str]] = {
    "mpips-bsp": ["--sync", "bsp"],
    "mpips-bsp-backup1": ["--sync", "bsp", "--backup-workers", "1"],
    "mpips-asp": ["--sync", "asp"],
    "mpips-ssp": ["--sync", "ssp"],
    "mpips-asp-no-lookahead": ["--sync", "asp", "--lookahead", "0", "--implicit-momentum"],
    "mpips-ssp-no-lookahead": ["--sync", "ssp", "--lookahead", "0", "--implicit-momentum"],
    "mpips-asp-im": ["--sync", "asp", "--implicit-momentum"],
    "mpips-asp-lookahead1": ["--sync", "asp", "--lookahead", "1"],
    "mpips-asp-plain": ["--sync", "asp", "--no-staleness-lr"],
    "mpips-asp-dc": ["--sync", "asp", "--dc-lambda", "2.0"],
}
SMOOTH = 5  # steps in the moving mean of the training loss compared with --target-loss
SLOW_VARIABLE, DEVICE_VARIABLE = "MPIPS_SLOW_WORKER", "MPIPS_DEVICE_MS"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("straggler")
    g.add_argument("--systems", default=",".join(SYSTEMS), help=f"systems (comma-separated; of {', '.join(SYSTEMS)})")
    g.add_argument("--workers", default=None, help="worker counts W, comma-separated (default: all ranks but one)")
    g.add_argument("--slow", default="1.0,2.0,4.0", help="how much slower the last worker computes, comma-separated")
    g.add_argument("--steps", type=int, default=50, help="global steps per run (bsp steps; asp/ssp: per worker)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per worker per step")
    g.add_argument("--hidden", type=int, default=1024, help="MLP hidden width (compute above the overheads)")
    g.add_argument("--optimizer", default="adam", help="optimizer (all systems)")
    g.add_argument("--lr", type=float, default=3e-3, help="learning rate (all systems)")
    g.add_argument("--staleness", type=int, default=2, help="ssp staleness bound")
    g.add_argument("--eval-every", type=int, default=2, help="worker 0 evaluates on the held-out split every N steps")
    g.add_argument("--seed", type=int, default=0,
                   help="repetition r trains with seed --seed + r (initialisation and sample order), the same for every"
                        " system: the median is over r trajectories, not r timings of one")
    g.add_argument("--target-accuracy", type=float, default=0.9, help="held-out accuracy target")
    g.add_argument("--target-loss", type=float, default=0.5, help="training-loss target (mean of worker 0's last 5)")
    g.add_argument("--device-ms", type=float, default=20.0,
                   help="milliseconds of device time every worker's step adds, off this host's cores"
                        " (MPIPS_DEVICE_MS; the slow worker's is f times as long; 0: CPU compute only)")
    g.add_argument("--workdir", default=None, help="where metrics files go (default: a temp dir)")


def _config(args: argparse.Namespace, system: str, metrics: str, seed: int) -> Config:
    argv = [
        "--model", "mlp", "--dataset", "digits", "--servers", "1", "--data-servers", "0",
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--staleness", str(args.staleness),
        "--optimizer", args.optimizer, "--lr", str(args.lr), "--hidden", str(args.hidden),
        "--threads", str(args.threads), "--log-every", str(10**9), "--eval-every", str(args.eval_every),
        "--seed", str(seed), "--metrics", metrics, *SYSTEMS[system],
    ]
    return parse_args(argv)


def _seed(args: argparse.Namespace, rep: int) -> int:
    """Repetition ``rep``'s seed (the untimed warm-up runs, ``rep`` < 0, take the first)."""
    return args.seed + max(rep, 0)


def _one_run(args, comm: MPI.Comm, system: str, workers: int, slow: float, workdir: str, rep: int
             ) -> dict[str, Any] | None:
    """One run on the first W + 1 ranks (the others wait); its figures on rank 0."""
    rank, ranks = comm.Get_rank(), workers + 1
    sub = comm.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
    out = None
    if sub != MPI.COMM_NULL:
        metrics = os.path.join(workdir, f"{system}-{workers}-{slow}-{rep}.jsonl")
        cfg = _config(args, system, metrics, _seed(args, rep))
        torch.set_num_threads(args.threads)
        os.environ[SLOW_VARIABLE] = f"{workers - 1}:{slow}"
        os.environ[DEVICE_VARIABLE] = str(args.device_ms)
        try:
            run_quietly(cfg, sub, metrics)
        finally:
            os.environ.pop(SLOW_VARIABLE, None)
            os.environ.pop(DEVICE_VARIABLE, None)
        sub.Barrier()
        if sub.Get_rank() == 0:
            with open(metrics) as f:
                out = figures([json.loads(line) for line in f], args.target_accuracy, args.target_loss)
        sub.Free()
    quiet_barrier(comm)
    return out


def figures(events: list[dict[str, Any]], target_accuracy: float, target_loss: float) -> dict[str, Any]:
    """A run's times to target (from the end of worker 0's first step) and final metric, from its
    metrics events (``mpips.metrics``)."""
    lead = [e for e in events if e.get("event") == "step" and e.get("worker") == 0]
    start = lead[0]["time"] if lead else None
    hit = next((e for e in events if e.get("event") == "eval" and start is not None
                and e.get("accuracy", 0.0) >= target_accuracy), None)
    to_acc = hit["time"] - start if hit else None
    losses, to_loss = [e["loss"] for e in lead], None
    for i in range(SMOOTH - 1, len(lead)):
        if sum(losses[i - SMOOTH + 1 : i + 1]) / SMOOTH <= target_loss:
            to_loss = lead[i]["time"] - start
            break
    end = next((e for e in reversed(events) if e.get("event") == "end"), {})
    return {"time_to_target_s": to_acc, "steps_to_target": hit["step"] if hit else None,
            "time_to_loss_target_s": to_loss, "final_metric": end.get("accuracy"),
            "late": end.get("late", 0), "max_staleness": end.get("max_staleness", 0),
            "wall_s": (max(e["time"] for e in events) - start) if start is not None else None}


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """Rows (system x W x slow factor) on rank 0; an empty list elsewhere."""
    size, rank = comm.Get_size(), comm.Get_rank()
    systems = parse_names(args.systems, "--systems", SYSTEMS)
    counts = sorted({int(w) for w in args.workers.split(",")}) if args.workers else [max(1, size - 1)]
    if any(w < 2 or w + 1 > size for w in counts):
        raise BenchError(f"--workers {counts}: a straggler needs W >= 2, and W + 1 ranks (the job has {size})")
    slows = [float(s) for s in args.slow.split(",")]
    if any(s < 1.0 for s in slows):
        raise BenchError(f"--slow {slows}: factors are 1.0 (no straggler) or more")
    workdir = args.workdir or comm.bcast(tempfile.mkdtemp(prefix="mpips-straggler-") if rank == 0 else None, root=0)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for rep in range(args.warmup):  # untimed: a process's first run pays torch's lazy imports (~1 s)
            _one_run(args, comm, systems[0], counts[0], 1.0, workdir, -1 - rep)
        for workers in counts:
            for slow in slows:
                for system in systems:
                    runs = [_one_run(args, comm, system, workers, slow, workdir, rep) for rep in range(args.reps)]
                    if rank == 0:
                        rows.append(_row(args, runs, system, workers, slow))
                        _add_ratios(rows)
                        print(format_rows(rows[-1:], title=False), f"({time.perf_counter() - t0:.0f} s so far)",
                              flush=True)
    finally:
        if rank == 0 and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.median(got)) if got else None


def _row(args, runs: list[dict[str, Any]], system: str, workers: int, slow: float) -> dict[str, Any]:
    times = [r["time_to_target_s"] for r in runs]
    return {
        "system": system, "workers": workers, "slow": slow, "ranks": workers + 1, "reps": len(runs),
        "target_accuracy": args.target_accuracy, "target_loss": args.target_loss,
        "time_to_target_s": _median(times),
        "reached_target": f"{sum(t is not None for t in times)}/{len(runs)}",
        "steps_to_target": _median([r["steps_to_target"] for r in runs]),
        "time_to_loss_target_s": _median([r["time_to_loss_target_s"] for r in runs]),
        "final_metric": _median([r["final_metric"] for r in runs]), "metric": "held-out accuracy",
        "late": _median([r["late"] for r in runs]), "max_staleness": max(r["max_staleness"] for r in runs),
        "wall_s": _median([r["wall_s"] for r in runs]),
        "runs": {k: [r[k] for r in runs] for k in ("time_to_target_s", "steps_to_target", "time_to_loss_target_s",
                                                    "final_metric")},
        "seeds": [_seed(args, r) for r in range(len(runs))],
        "steps": args.steps, "batch_size": args.batch_size, "hidden": args.hidden, "threads": args.threads,
        "device_ms": args.device_ms,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_vs_bsp: time to target over bsp's at the same W and slow factor."""
    bsp = {(r["workers"], r["slow"]): r for r in rows if r["system"] == "mpips-bsp"}
    for r in rows:
        b = bsp.get((r["workers"], r["slow"]))
        r["ratio_vs_bsp"] = ratio(r["time_to_target_s"], b and b["time_to_target_s"])
        r["loss_ratio_vs_bsp"] = ratio(r["time_to_loss_target_s"], b and b["time_to_loss_target_s"])


def format_rows(rows: list[dict[str, Any]], title: bool = True) -> str:
    header = ["W", "slow", "system", "to target s", "reached", "x bsp", "to loss s", "x bsp (loss)", "final acc",
              "late", "max stale"]
    table = [[r["workers"], r["slow"], r["system"], r["time_to_target_s"], r["reached_target"], r["ratio_vs_bsp"],
              r["time_to_loss_target_s"], r["loss_ratio_vs_bsp"], r["final_metric"], r["late"], r["max_staleness"]]
             for r in rows]
    target = rows[0]["target_accuracy"] if rows else None
    return format_table(f"straggler: seconds to held-out accuracy {target} with the last worker slowed (median of"
                        " runs); x bsp: over bsp's, same W and slow factor" if title else "straggler: row",
                        header, table)

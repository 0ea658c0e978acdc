"""``train``: end-to-end throughput and time to a target loss, mpips against DDP and allreduce.

For every model and worker count W, in one mpirun job and on the first ranks of it:

- ``mpips-bsp`` / ``mpips-asp`` / ``mpips-ssp``: ``mpips.train.run`` on W + 1 ranks (1 parameter
  server, ``--data-servers 0``: workers read their own data, as the baselines do); the numbers
  come from the ``--metrics`` JSON-lines file the run writes;
- ``ddp``: PyTorch ``DistributedDataParallel``, gloo backend, on W ranks, its process group
  initialised from the MPI ranks (rank 0 picks a free port and broadcasts it);
- ``allreduce``: plain data parallel: backward into one flat gradient, ``Allreduce`` it with
  mpi4py, divide by W, every worker steps the same local optimizer;
- ``mpips-bsp-whole`` (not in the default ``--systems``): bsp with ``--no-pull-ahead``, each
  version applied and pulled whole: what pulling ahead (``mpips.client.pullahead``) gains;
- ``mpips-own``: bsp through the library API (``mpips.init``, ``job.optimizer``) with the
  baselines' loop: what a user's own loop gets; ``x fit`` is its ratio to ``mpips-bsp`` (fit's
  own loop) and to ``mpips-bsp-whole`` (the same whole pulls an own loop makes).

All five train the same model from the same seeded initial parameters, on the same samples in
the same order (``EpochPlan``: worker w takes slice w of every global batch), with the same
per-worker batch, optimizer and torch threads per rank. Throughput counts the samples of all
workers between the end of the last worker's ``--warmup-steps``-th step and the end of the run.
Time to target: from the end of worker 0's first step to the first step at which the mean of
worker 0's last 5 training losses is at or below the target. Efficiency at W workers is
throughput / (W x the same system's one-worker throughput).

    mpirun -n 4 python -m mpips.bench train --models mlp --workers 1,2,3
    mpirun -n 4 python -m mpips.bench train --models gpt --gpt-layers 4 --gpt-width 256 --steps 60
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import io
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips.bench.common import BenchError, Spread, format_table, parse_names, quiet_barrier, ratio, run_quietly
from mpips.config import Config, parse_args
from mpips.data import EpochPlan, LocalSource, open_dataset
from mpips.metrics import Progress
from mpips.models import build_model, loss_and_correct
from mpips.optim import build_optimizer, optimizer_class
from mpips.shard import ShardPlan
from mpips.worker import FlatModel

__all__ = ["DEFAULT_SYSTEMS", "SYSTEMS", "add_arguments", "format_rows", "run"]

SYSTEMS = ("mpips-bsp", "mpips-asp", "mpips-ssp", "ddp", "allreduce", "mpips-own", "mpips-bsp-whole")
DEFAULT_SYSTEMS = SYSTEMS[:6]  # mpips-bsp-whole: bsp with --no-pull-ahead, the pipeline's own baseline
DATASET = {"mlp": "digits", "cnn": "digits", "gpt": "pytext"}
TARGET = {"mlp": 0.5, "cnn": 0.5, "gpt": 3.0}
SMOOTH = 5  # steps in the moving mean of the loss compared with the target


def add_arguments(p: argparse.ArgumentParser, steps: int = 40, train_reps: int = 2) -> None:
    g = p.add_argument_group("train")
    g.add_argument("--models", default="mlp,gpt", help="models: mlp, cnn, gpt (comma-separated)")
    g.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"systems to run (comma-separated; of {', '.join(SYSTEMS)})")
    g.add_argument("--workers", default=None,
                   help="worker counts W, comma-separated (default: 1 and all ranks but one)")
    g.add_argument("--steps", type=int, default=steps, help="global steps per run")
    g.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the throughput")
    g.add_argument("--train-reps", type=int, default=train_reps,
                   help="runs of every configuration (median and min/max over them)")
    g.add_argument("--batch-size", type=int, default=32, help="samples per worker per step")
    g.add_argument("--optimizer", default="adam", help="optimizer (all systems)")
    g.add_argument("--lr", type=float, default=3e-3, help="learning rate (all systems)")
    g.add_argument("--hidden", type=int, default=512, help="MLP hidden width")
    g.add_argument("--gpt-layers", type=int, default=2, help="GPT blocks")
    g.add_argument("--gpt-width", type=int, default=64, help="GPT width")
    g.add_argument("--gpt-context", type=int, default=32, help="GPT context (bytes)")
    g.add_argument("--target-loss", type=float, default=None,
                   help=f"target training loss (default per model: {TARGET})")
    g.add_argument("--staleness", type=int, default=2, help="ssp staleness bound")
    g.add_argument("--workdir", default=None, help="where metrics files go (default: a temp dir)")


def _config(args: argparse.Namespace, model: str, sync: str, metrics: str | None) -> Config:
    """The mpips configuration of one run; ``sync`` bsp, asp, ssp or bsp-whole (bsp, --no-pull-ahead)."""
    whole = sync == "bsp-whole"
    sync = "bsp" if whole else sync
    argv = [
        "--model", model, "--dataset", DATASET[model], "--servers", "1", "--data-servers", "0",
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--sync", sync,
        "--staleness", str(args.staleness), "--optimizer", args.optimizer, "--lr", str(args.lr),
        "--hidden", str(args.hidden), "--gpt-layers", str(args.gpt_layers),
        "--gpt-width", str(args.gpt_width), "--gpt-context", str(args.gpt_context),
        "--threads", str(args.threads), "--log-every", str(10**9), "--pull", "auto", "--no-final-eval",
    ]
    if metrics:
        argv += ["--metrics", metrics]
    if whole:
        argv.append("--no-pull-ahead")
    return parse_args(argv)


# -- one run of each system; every function returns per-worker step records on every rank -----
# A record is (step, end time in seconds since the epoch, samples, loss).

def _run_mpips(cfg: Config, sub: MPI.Comm, data, metrics: str) -> list[list[tuple]] | None:
    run_quietly(cfg, sub, metrics)
    sub.Barrier()
    if sub.Get_rank() != 0:
        return None
    workers = sub.Get_size() - 1
    plan = _epoch_plan(data, workers, cfg)
    records: list[list[tuple]] = [[] for _ in range(workers)]
    with open(metrics) as f:
        for line in f:
            e = json.loads(line)
            if e.get("event") != "step":
                continue
            w = e["worker"]
            epoch, in_epoch = plan.position(e["step"] - 1)
            n = len(plan.worker_ids(epoch, in_epoch, w))
            records[w].append((e["step"], e["time"], n, e["loss"]))
    return records


def _epoch_plan(data, workers: int, cfg: Config) -> EpochPlan:
    """The sample order mpips.train uses for this dataset (partition-aware where it has one)."""
    if hasattr(data, "plan"):
        return data.plan(workers, cfg.data.batch_size, cfg.train.seed)
    return EpochPlan(len(data.train), workers, cfg.data.batch_size, cfg.train.seed)


def _open(name: str, context: int, comm: MPI.Comm):
    """The dataset as mpips.train opens it (collectively where open_dataset takes a comm)."""
    if "comm" in inspect.signature(open_dataset).parameters:
        return open_dataset(name, None, context=context, comm=comm)
    return open_dataset(name, None, context=context)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _baseline_loop(cfg: Config, sub: MPI.Comm, data, model, step_fn) -> list[list[tuple]] | None:
    """Shared loop of the baselines: this worker's batches, ``step_fn(loss)`` after backward."""
    mine = _loop(cfg, data, model, step_fn, sub.Get_rank(), sub.Get_size())
    gathered = sub.gather(mine, root=0)
    return gathered if sub.Get_rank() == 0 else None


def _loop(cfg: Config, data, model, step_fn, w: int, workers: int) -> list[tuple]:
    """Worker ``w`` of ``workers``: its batches, ``step_fn(loss)`` after each forward; its records."""
    plan = _epoch_plan(data, workers, cfg)
    source = LocalSource(data.train, plan, w)
    mine = []
    for step in range(cfg.train.steps):
        batch = source.batch(*plan.position(step))
        x, y = torch.from_numpy(batch.x), torch.from_numpy(batch.y)
        loss, _ = loss_and_correct(model(x), y)
        step_fn(loss)
        mine.append((step + 1, time.time(), len(batch), float(loss.detach())))
    return mine


def _run_ddp(cfg: Config, sub: MPI.Comm, data) -> list[list[tuple]] | None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    port = sub.bcast(_free_port() if sub.Get_rank() == 0 else None, root=0)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=sub.Get_rank(),
        world_size=sub.Get_size(), timeout=timedelta(seconds=300),
    )
    model = DistributedDataParallel(build_model(cfg.model, data.spec, cfg.train.seed))
    opt = build_optimizer(list(model.parameters()), cfg.optim)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=False)
        loss.backward()  # DDP averages the gradients across workers (bucketed, overlapped)
        opt.step()

    try:
        return _baseline_loop(cfg, sub, data, model, step)
    finally:
        # The DDP reducer must die before the process group, here and now: if it is collected
        # later it may hold the last reference to the group, whose destructor then joins a gloo
        # thread that waits for the GIL the destructor holds (a deadlock seen with torch 2.13).
        step = opt = model = None  # noqa: F841 - drop the references, see above
        gc.collect()
        sub.Barrier()
        dist.destroy_process_group()


def _run_own(cfg: Config, sub: MPI.Comm, data) -> list[list[tuple]] | None:
    """The baselines' loop over ``job.optimizer`` (bsp, 1 server: the highest rank of ``sub``)."""
    import mpips

    with contextlib.redirect_stdout(io.StringIO()):  # the role map
        job = mpips.init(config=cfg, comm=sub, handle_signals=False)
    mine = None
    if job.is_worker:
        model = build_model(cfg.model, data.spec, cfg.train.seed)
        cls, kwargs = optimizer_class(cfg.optim)
        opt = job.optimizer(model, cls, **kwargs)

        def step(loss: torch.Tensor) -> None:
            opt.zero_grad()
            loss.backward()
            opt.step()

        mine = _loop(cfg, data, model, step, job.worker_index, job.num_workers)
        job.finish()
    else:
        job.serve()
    gathered = sub.gather(mine, root=0)
    return [g for g in gathered if g is not None] if sub.Get_rank() == 0 else None


def _run_allreduce(cfg: Config, sub: MPI.Comm, data) -> list[list[tuple]] | None:
    model = build_model(cfg.model, data.spec, cfg.train.seed)
    flat = FlatModel(model, ShardPlan.for_module(model, 1), torch.device("cpu"))
    opt = build_optimizer(list(model.parameters()), cfg.optim)
    workers = sub.Get_size()

    def step(loss: torch.Tensor) -> None:
        flat.grads.zero_()
        loss.backward()
        sub.Allreduce(MPI.IN_PLACE, flat.host_grad, op=MPI.SUM)
        flat.grads.div_(workers)
        opt.step()

    return _baseline_loop(cfg, sub, data, model, step)


# -- turning records into figures ---------------------------------------------------------------

def _throughput(records: list[list[tuple]], warmup: int) -> float:
    warmup = min(warmup, min(len(r) for r in records) - 1)
    start = max(r[warmup - 1][1] for r in records) if warmup > 0 else min(r[0][1] for r in records)
    end = max(r[-1][1] for r in records)
    samples = sum(n for r in records for (_, t, n, _) in r if t > start)
    return samples / (end - start) if end > start else float("nan")


def _time_to_target(records: list[list[tuple]], target: float) -> float | None:
    lead = records[0]
    losses = [loss for (_, _, _, loss) in lead]
    for i in range(len(lead)):
        window = losses[max(0, i - SMOOTH + 1) : i + 1]
        if i >= 1 and len(window) == SMOOTH and sum(window) / SMOOTH <= target:
            return lead[i][1] - lead[0][1]
    return None


def _final_loss(records: list[list[tuple]]) -> float:
    return float(np.mean([loss for (_, _, _, loss) in records[0][-SMOOTH:]]))


def _warm_optimizer(cfg: Config) -> None:
    """One throw-away step: torch.optim's first step in a process pays one-time lazy imports
    (about a second here), which would land inside mpips' run (on the server) but inside the
    baselines' first step only."""
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    build_optimizer([p], cfg.optim).step()


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """Rows (model x system x W) on rank 0; an empty list elsewhere."""
    size, rank = comm.Get_size(), comm.Get_rank()
    models = parse_names(args.models, "--models", DATASET)
    systems = parse_names(args.systems, "--systems", SYSTEMS)
    counts = sorted({int(w) for w in args.workers.split(",")}) if args.workers else sorted({1, max(1, size - 1)})
    if any(w < 1 or w > size for w in counts):
        raise BenchError(f"--workers {counts}: with {size} ranks, W must be 1..{size}")
    if args.steps <= args.warmup_steps + 1:
        raise BenchError("--steps must exceed --warmup-steps + 1")
    _warm_optimizer(_config(args, models[0], "bsp", None))
    workdir = args.workdir or comm.bcast(
        tempfile.mkdtemp(prefix="mpips-bench-") if rank == 0 else None, root=0)
    rows: list[dict[str, Any]] = []
    planned = len(models) * args.train_reps * sum(
        1 for w in counts for s in systems if (w + 1 if s.startswith("mpips") else w) <= size)
    # a long benchmark shows how far it is: a bar on a terminal, else a line per run (with the time left)
    progress = Progress(planned, 1, enabled=rank == 0, unit="train run")
    done = [0, time.perf_counter()]
    try:
        for model in models:
            target = args.target_loss if args.target_loss is not None else TARGET[model]
            data = _open(DATASET[model], args.gpt_context, comm)
            spec_cfg = _config(args, model, "bsp", None).model
            params = sum(p.numel() for p in build_model(spec_cfg, data.spec, 0).parameters())
            for workers in counts:
                for system in systems:
                    ranks = workers + 1 if system.startswith("mpips") else workers
                    if ranks > size:
                        if rank == 0:
                            print(f"train: skipping {system} at W={workers}: needs {ranks} ranks,"
                                  f" the job has {size}", flush=True)
                        continue
                    runs = []
                    for rep in range(args.train_reps):
                        t0 = time.perf_counter()
                        runs.append(_one_run(args, comm, model, system, ranks, data, workdir, rep))
                        done[0] += 1
                        left = (time.perf_counter() - done[1]) / done[0] * (planned - done[0])
                        progress.update(done[0] - 1, model=model, system=system, ranks=ranks,
                                        repetition=f"{rep + 1}/{args.train_reps}",
                                        took=f"{time.perf_counter() - t0:.1f} s", left=f"about {left:,.0f} s")
                    if rank == 0:
                        rows.append(_row(args, runs, model, params, system, workers, ranks, target))
                        _add_ratios(rows)  # against the baselines measured so far
                        print(format_rows(rows[-1:], title=False), flush=True)  # each row as it is measured
    finally:
        progress.close()
        if rank == 0 and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if rank == 0:
        _add_ratios(rows)
    return rows


def _one_run(args, comm: MPI.Comm, model: str, system: str, ranks: int, data, workdir: str,
             rep: int) -> list[list[tuple]] | None:
    """One run of ``system`` on the first ``ranks`` ranks; the others wait, sleeping."""
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
    records = None
    if sub != MPI.COMM_NULL:
        mpips = system.startswith("mpips")
        metrics = os.path.join(workdir, f"{model}-{system}-{ranks}-{rep}.jsonl")
        sync = system.removeprefix("mpips-") if mpips and system != "mpips-own" else "bsp"
        cfg = _config(args, model, sync, metrics)
        torch.set_num_threads(args.threads)
        if system == "mpips-own":
            records = _run_own(cfg, sub, data)
        elif mpips:
            records = _run_mpips(cfg, sub, data, metrics)
        elif system == "ddp":
            records = _run_ddp(cfg, sub, data)
        else:
            records = _run_allreduce(cfg, sub, data)
        sub.Free()
    quiet_barrier(comm)
    return records


def _row(args, runs, model, params, system, workers, ranks, target) -> dict[str, Any]:
    thr = Spread.of([_throughput(r, args.warmup_steps) for r in runs])
    ttt = [t for t in (_time_to_target(r, target) for r in runs) if t is not None]
    return {
        "model": model, "params": params, "system": system, "workers": workers,
        "ranks": ranks, "servers": ranks - workers, "data_servers": 0,
        "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
        "samples_per_s": thr.median, "target_loss": target,
        "time_to_target_s": float(np.median(ttt)) if ttt else None,
        "reached_target": f"{len(ttt)}/{len(runs)}",
        "final_loss": float(np.median([_final_loss(r) for r in runs])),
        "spread": {"samples_per_s": thr.as_dict()},
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_vs_ddp / ratio_vs_allreduce at the same model and W; efficiency vs W = 1."""
    by = {(r["model"], r["system"], r["workers"]): r for r in rows}
    for r in rows:
        key = (r["model"], r["workers"])
        ddp, ar = by.get((*key[:1], "ddp", key[1])), by.get((*key[:1], "allreduce", key[1]))
        r["ratio_vs_ddp"] = ratio(r["samples_per_s"], ddp and ddp["samples_per_s"])
        r["ratio_vs_allreduce"] = ratio(r["samples_per_s"], ar and ar["samples_per_s"])
        one = by.get((r["model"], r["system"], 1))
        r["efficiency"] = ratio(r["samples_per_s"], one and r["workers"] * one["samples_per_s"])
        if r["system"] == "mpips-own":  # the own loop against fit's, pipelined and whole
            for key, fit in (("ratio_vs_fit", "mpips-bsp"), ("ratio_vs_fit_whole", "mpips-bsp-whole")):
                f = by.get((r["model"], fit, r["workers"]))
                r[key] = ratio(r["samples_per_s"], f and f["samples_per_s"])


def format_rows(rows: list[dict[str, Any]], title: bool = True) -> str:
    header = ["model", "params", "W", "ranks", "system", "samples/s", "±", "x DDP", "x allreduce", "x fit",
              "efficiency", "to target s", "final loss"]
    table = []
    for r in rows:
        s = r["spread"]["samples_per_s"]
        spread = f"{(s['max'] - s['min']) / 2 / s['median'] * 100:.0f}%" if s["median"] else "-"
        table.append([
            r["model"], f"{r['params'] / 1e6:.2f}M", r["workers"], r["ranks"], r["system"],
            r["samples_per_s"], spread, r["ratio_vs_ddp"], r["ratio_vs_allreduce"], r.get("ratio_vs_fit"),
            r["efficiency"], r["time_to_target_s"], r["final_loss"],
        ])
    return format_table("train: end-to-end samples/s (median of runs, ± = half the min-max range);"
                        " target = mean of worker 0's last 5 losses" if title else "train: row", header, table)

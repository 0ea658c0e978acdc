"""``compress``: gradient codecs on the push path and low-precision pulls, against float32 in the same job.

For every model and setting, on the first 3 ranks of the job (2 workers, 1 parameter server,
``--data-servers 0``: the same samples in the same order as the default job), one
``mpips.train.run`` in bsp:

- ``push`` codec ``none`` (float32: the baseline), then each ``--codecs`` entry with its default
  error feedback (on for topk and sign), then ``--compress none`` with each ``--pull-codecs``;
  then, for the mlp unless ``--no-dgc``, deep gradient compression against its own baseline:
  float32 with ``--optimizer momentum --lr --dgc-lr``, and top-k with ``--momentum-correction``
  and ``--sparsity-warmup --dgc-warmup`` on the same optimizer (the momentum moves to the workers);
- push and pull bytes per worker and step (from the run's ``end`` event), and the push ratio to
  float32: float32 bytes / codec bytes;
- samples/s of all workers: per worker, batch x its steps after the first ``WARMUP`` over the
  time from its ``WARMUP``-th ``step`` event to its last, summed; and its ratio to float32's
  (above 1: encoding cost less time than the bytes it saved). An untimed 3-step run first pays
  the one-time costs (lazy imports, allocator) that would otherwise land in the first row;
- encode and decode throughput of the codec on rank 0 alone, in MB/s of float32 gradient, on one
  chunk of ``--codec-mb`` MB (encode with the run's error feedback; decode = validate + add into
  an accumulator, what a bsp server does);
- the model's quality at the end: ``mlp`` (the default job: digits, 30 epochs unless
  ``--mlp-epochs``) held-out accuracy; ``gpt`` (``--gpt-*``: a byte GPT on pytext, a few M
  parameters) held-out loss on the first ``--gpt-eval`` held-out samples; both against float32's.

    mpirun -n 3 python -m mpips.bench compress
    mpirun -n 3 python -m mpips.bench compress --models mlp --codecs topk,sign --json c.json
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

from mpips.bench.common import (
    BenchError,
    format_table,
    parse_names,
    quiet_barrier,
    ratio,
    run_quietly,
    time_repeated,
)
from mpips.compression import CODECS, make_codec, make_encoder, parse_payload
from mpips.config import parse_args
from mpips.data import open_dataset
from mpips.models import build_model
from mpips.tasks import resolve_loss
from mpips.transport import PULL_CODECS
from mpips.worker import evaluate

__all__ = ["add_arguments", "format_rows", "run"]

RANKS = 3  # 2 workers + 1 server
WARMUP = 5  # steps per worker left out of samples/s


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compress")
    g.add_argument("--models", default="mlp,gpt", help="mlp (the default job) and/or gpt")
    g.add_argument("--codecs", default=",".join(CODECS[1:]), help="push codecs besides none (comma-separated)")
    g.add_argument("--pull-codecs", default="bf16", help="pull codecs besides fp32, each with --compress none")
    g.add_argument("--compress-ratio", type=float, default=0.01, help="topk, randomk: fraction sent")
    g.add_argument("--qsgd-levels", type=int, default=8, help="qsgd levels")
    g.add_argument("--mlp-epochs", type=float, default=30.0, help="mlp: epochs (30 = the default job)")
    g.add_argument("--gpt-steps", type=int, default=40, help="gpt: global steps")
    g.add_argument("--gpt-layers", type=int, default=4, help="gpt: blocks")
    g.add_argument("--gpt-width", type=int, default=256, help="gpt: width (4 x 256: 3.3 M parameters)")
    g.add_argument("--gpt-context", type=int, default=64, help="gpt: context (bytes)")
    g.add_argument("--gpt-batch", type=int, default=8, help="gpt: samples per worker per step")
    g.add_argument("--gpt-eval", type=int, default=512, help="gpt: held-out samples evaluated")
    g.add_argument("--codec-mb", type=float, default=16.0, help="float32 MB encoded per throughput timing")
    g.add_argument("--dgc", action=argparse.BooleanOptionalAction, default=True,
                   help="mlp: also float32 and topk with DGC (momentum correction, sparsity warm-up) on momentum SGD")
    g.add_argument("--dgc-lr", type=float, default=0.1, help="DGC rows: momentum SGD's learning rate")
    g.add_argument("--dgc-warmup", type=int, default=92,
                   help="DGC rows: --sparsity-warmup in steps (92 = 4 epochs of the default job, as DGC's 4)")
    g.add_argument("--workdir", default=None, help="where metrics and models go (default: a temp dir)")


def _settings(args: argparse.Namespace, model: str) -> list[tuple[str, str, str]]:
    """(push, pull, variant): variant "" (the default optimizer), "momentum" (float32 on momentum
    SGD, the DGC rows' baseline) or "dgc" (topk with momentum correction and sparsity warm-up)."""
    codecs = parse_names(args.codecs, "--codecs", CODECS)
    pulls = parse_names(args.pull_codecs, "--pull-codecs", PULL_CODECS)
    dgc = [("none", "fp32", "momentum"), ("topk", "fp32", "dgc")] if args.dgc and model == "mlp" else []
    return [("none", "fp32", "")] + [(c, "fp32", "") for c in codecs if c != "none"] + [
        ("none", c, "") for c in pulls if c != "fp32"] + dgc


def _argv(args: argparse.Namespace, model: str, push: str, pull: str, metrics: str, save: str,
          variant: str = "") -> list[str]:
    argv = ["--servers", "1", "--data-servers", "0", "--sync", "bsp", "--compress", push, "--pull-codec", pull,
            "--compress-ratio", str(args.compress_ratio), "--qsgd-levels", str(args.qsgd_levels),
            "--threads", str(args.threads), "--log-every", str(10**9), "--metrics", metrics, "--save", save]
    if variant:
        argv += ["--optimizer", "momentum", "--lr", str(args.dgc_lr)]
    if variant == "dgc":
        argv += ["--momentum-correction", "--sparsity-warmup", str(args.dgc_warmup)]
    if model == "mlp":
        return [*argv, "--epochs", str(args.mlp_epochs)]
    return [*argv, "--model", "gpt", "--dataset", "pytext", "--steps", str(args.gpt_steps),
            "--gpt-layers", str(args.gpt_layers), "--gpt-width", str(args.gpt_width),
            "--gpt-context", str(args.gpt_context), "--batch-size", str(args.gpt_batch), "--no-final-eval"]


def _codec_speed(args: argparse.Namespace, push: str, cfg) -> tuple[float | None, float | None]:
    """Encode and decode MB/s (float32 bytes) of ``push`` on one chunk; rank 0 alone."""
    n = int(args.codec_mb * 1e6) // 4
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(n)
    c = cfg.compression
    codec = make_codec(push, args.compress_ratio, args.qsgd_levels, c.feedback())
    if codec is None:  # float32: the copy into the push buffer, and the server's add
        out = np.empty(n, dtype=np.float32)
        enc = time_repeated(lambda: np.copyto(out, x.numpy()), args.reps, args.warmup)
        dec = time_repeated(lambda: acc.add_(x, alpha=2.0), args.reps, args.warmup)
    else:
        encoder = make_encoder(codec, n, c.feedback(), *c.worker_momentum(cfg.optim))  # DGC: after warm-up
        enc = time_repeated(lambda: encoder.encode(x, 7, 0), args.reps, args.warmup)
        payload = np.concatenate([encoder.encode(x, 7, 0), np.ones(1, np.uint8)])
        dec = time_repeated(lambda: parse_payload(codec, payload, [(0, n)], [7], 1)[0].add_into(acc, 2.0),
                            args.reps, args.warmup)
    mb = 4 * n / 1e6
    return mb / float(np.median(enc)), mb / float(np.median(dec))


def _one(args, comm: MPI.Comm, sub: MPI.Comm, model: str, push: str, pull: str, data, workdir: str,
         record: bool = True, variant: str = "") -> dict[str, Any] | None:
    rank = comm.Get_rank()
    metrics = os.path.join(workdir, f"{model}-{push}-{pull}{variant}.jsonl")
    save = os.path.join(workdir, f"{model}-{push}-{pull}{variant}.pt")
    cfg = parse_args(_argv(args, model, push, pull, metrics, save, variant))
    t0 = time.perf_counter()
    if sub != MPI.COMM_NULL:
        run_quietly(cfg, sub, metrics)
    quiet_barrier(comm)
    wall = time.perf_counter() - t0
    if rank != 0 or not record:
        return None
    with open(metrics) as f:
        events = [json.loads(line) for line in f]
    end = next(e for e in events if e["event"] == "end")
    times: dict[int, list[float]] = {}
    for e in events:
        if e["event"] == "step":
            times.setdefault(e["worker"], []).append(e["time"])
    steps, workers = end["step"], len(times)
    encode, decode = _codec_speed(args, push, cfg)
    row = {
        "model": model, "push": push, "pull": pull, "error_feedback": cfg.compression.feedback(),
        "variant": variant, "optimizer": cfg.optim.optimizer,
        "steps": steps, "workers": workers,
        "push_bytes_per_step": end["bytes_pushed"] / (steps * workers),
        "pull_bytes_per_step": end["bytes_pulled"] / (steps * workers),
        "encode_mb_s": encode, "decode_mb_s": decode,
        "samples_per_s": sum(cfg.data.batch_size * (len(t) - WARMUP) / (t[-1] - t[WARMUP - 1]) for t in times.values()),
        "wall_s": wall,
    }
    if model == "mlp":
        row["accuracy"], row["loss"] = end["accuracy"], end["loss"]
    else:
        net = build_model(cfg.model, data.spec, cfg.train.seed)
        net.load_state_dict(torch.load(save, weights_only=True))
        k = min(args.gpt_eval, len(data.val_y))
        held_out = evaluate(net, data.val_x[:k], data.val_y[:k], torch.device("cpu"), task="tokens",
                            loss=resolve_loss("auto", "tokens"))
        row["loss"], row["accuracy"] = held_out["loss"], held_out["accuracy"]
    print(f"compress: {model} push {push} pull {pull} {variant}: {wall:.1f} s", flush=True)
    return row


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict[str, Any]]:
    """Rows (model x setting) on rank 0; an empty list elsewhere."""
    rank = comm.Get_rank()
    if comm.Get_size() < RANKS:
        raise BenchError(f"compress needs {RANKS} ranks (2 workers, 1 server); the job has {comm.Get_size()}")
    models = parse_names(args.models, "--models", ("mlp", "gpt"))
    for model in models:
        _settings(args, model)  # bad --codecs / --pull-codecs: before anything runs
    if args.gpt_steps <= WARMUP + 1 or args.mlp_epochs < 0.5:
        raise BenchError(f"--gpt-steps must exceed {WARMUP + 1} and --mlp-epochs be at least 0.5 (samples/s"
                         f" leaves out {WARMUP} steps)")
    workdir = args.workdir or comm.bcast(tempfile.mkdtemp(prefix="mpips-bench-") if rank == 0 else None, root=0)
    sub = comm.Split(0 if rank < RANKS else MPI.UNDEFINED, rank)
    rows: list[dict[str, Any]] = []
    try:
        warm = argparse.Namespace(**{**vars(args), "mlp_epochs": 0.35})  # 8 steps
        _one(warm, comm, sub, "mlp", "none", "fp32", None, workdir, record=False)
        for model in models:
            data = None  # the gpt's held-out samples, evaluated on rank 0
            if rank == 0 and model == "gpt":
                data = open_dataset("pytext", None, context=args.gpt_context, comm=MPI.COMM_SELF)
            for push, pull, variant in _settings(args, model):
                row = _one(args, comm, sub, model, push, pull, data, workdir, variant=variant)
                if row is not None:
                    rows.append(row)
                    _add_ratios(rows)
                    print(format_rows(rows[-1:], title=False), flush=True)
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()
        if rank == 0 and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Against the float32 row (push none, pull fp32) of the same model and optimizer, measured in
    the same job (the DGC row against float32 on momentum SGD)."""
    base = {(r["model"], r["optimizer"]): r for r in rows if r["push"] == "none" and r["pull"] == "fp32"}
    for r in rows:
        b = base.get((r["model"], r["optimizer"]))
        r["push_ratio"] = ratio(b and b["push_bytes_per_step"], r["push_bytes_per_step"])
        r["pull_ratio"] = ratio(b and b["pull_bytes_per_step"], r["pull_bytes_per_step"])
        r["speed_ratio"] = ratio(r["samples_per_s"], b and b["samples_per_s"])
        r["accuracy_delta"] = r["accuracy"] - b["accuracy"] if b else None
        r["loss_delta"] = r["loss"] - b["loss"] if b else None


def format_rows(rows: list[dict[str, Any]], title: bool = True) -> str:
    header = ["model", "push", "pull", "EF", "push B/step", "x fewer", "pull B/step", "x fewer",
              "encode MB/s", "decode MB/s", "samples/s", "x fp32", "accuracy", "Δ acc", "loss", "Δ loss"]
    names = {"": "{}", "momentum": "{} (momentum)", "dgc": "{} + DGC (momentum)"}
    table = [[r["model"], names[r.get("variant", "")].format(r["push"]), r["pull"],
              "on" if r["error_feedback"] else "off",
              r["push_bytes_per_step"], r["push_ratio"], r["pull_bytes_per_step"], r["pull_ratio"],
              r["encode_mb_s"], r["decode_mb_s"], r["samples_per_s"], r["speed_ratio"],
              r["accuracy"], r["accuracy_delta"], r["loss"], r["loss_delta"]] for r in rows]
    return format_table(
        "compress: bytes per worker and step, codec throughput on rank 0 (MB/s of float32), samples/s"
        " of both workers, held-out accuracy/loss (gpt: next-byte), each against float32 in this job"
        if title else "compress: row", header, table)

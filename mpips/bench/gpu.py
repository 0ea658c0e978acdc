"""``python -m mpips.bench.gpu {compare,pull,loop}``: the measurements of ``jobs/device-check.sh``.

- ``compare A.pt B.pt``: relative difference ``||a - b|| / ||b||`` (L2 over all float tensors of
  two saved state_dicts, e.g. after 20 bsp steps on the GPU and on the CPU); exit 1 above ``--rtol``.
- ``pull`` (under ``mpirun -n 2``): rank 0 exposes a ``--mib`` shard in a ``ParameterWindow``;
  rank 1 pulls it (a) into pinned host memory, then copies it to the GPU chunk by chunk on a side
  stream (the staging path, ``mpips.client.staging``), and (b) where the MPI library says it is
  CUDA-aware, straight into GPU memory (the direct path). Baselines: the same pull into host
  memory alone, and a raw pinned host -> device ``copy_`` of the same bytes. GB/s, best of ``--reps``.
- ``loop``: a plain single-GPU torch loop (no MPI): ``ByteGPT`` on the pytext bytes, AdamW on the
  GPU, bf16 autocast, the same batch and model flags as ``mpips.train``; prints samples/s after
  ``--warmup`` steps, the baseline for mpips with 1 GPU worker.

Every subcommand needs what it measures: ``pull`` and ``loop`` exit 1 with one line where torch
sees no CUDA device. Nothing here has run on a GPU yet (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "relative_difference"]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over every floating point tensor of two state_dicts (float64 sums).

    Raises:
        ValueError: when the two hold different names or shapes.
    """
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("the two state_dicts hold different tensors")
    diff = ref = 0.0
    for k in a:
        if a[k].is_floating_point():
            x, y = a[k].double().cpu(), b[k].double().cpu()
            diff += float(((x - y) ** 2).sum())
            ref += float((y**2).sum())
    return (diff / ref) ** 0.5 if ref else float(diff > 0)


def _need_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        print(f"mpips.bench.gpu {what}: no CUDA device visible to torch {torch.__version__}"
              " (torch.cuda.is_available() is False); this measurement needs a GPU", file=sys.stderr)
        raise SystemExit(1)


def _compare(args: argparse.Namespace) -> int:
    a, b = torch.load(args.a, map_location="cpu"), torch.load(args.b, map_location="cpu")
    rel = relative_difference(a, b)
    ok = rel <= args.rtol
    print(json.dumps({"relative_difference": rel, "rtol": args.rtol, "ok": ok}))
    return 0 if ok else 1


def _pull(args: argparse.Namespace) -> int:
    _need_cuda("pull")
    from mpi4py import MPI

    from mpips.client.staging import CudaCopyEngine
    from mpips.cuda_aware import decide, library_lookup, query
    from mpips.doctor import find_loaded_libmpi
    from mpips.transport import HEADER_BYTES, ParameterWindow

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        print("mpips.bench.gpu pull: run it under mpirun -n 2", file=sys.stderr)
        return 1
    n = args.mib * 2**20 // 4
    window = ParameterWindow(comm, n if comm.rank == 0 else 0, init=np.ones(n, dtype=np.float32) if comm.rank == 0
                             else None)
    libmpi = find_loaded_libmpi(Path("/proc/self/maps").read_text())
    support = query(library_lookup(libmpi), MPI.Get_library_version().splitlines()[0], os.environ)
    direct = decide("auto", support, "cuda").path == "direct"
    results = {}
    if comm.rank == 1:
        device = torch.device("cuda", 0)
        status = np.zeros((1, HEADER_BYTES // 8), dtype=np.int64)
        host = torch.empty(n, dtype=torch.float32, pin_memory=True)
        dev = torch.empty(n, dtype=torch.float32, device=device)
        engine, chunk = CudaCopyEngine(device), 2**20

        def best(op) -> float:
            times = []
            for _ in range(args.reps + 1):
                torch.cuda.synchronize(device)
                t = time.perf_counter()
                op()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            return 4 * n / min(times[1:]) / 1e9

        def staged() -> None:
            window.pull([0], status, [host.numpy()])
            events = [engine.copy(dev[a : a + chunk], host[a : a + chunk]) for a in range(0, n, chunk)]
            for e in events:
                engine.wait_compute(e)

        results["pull into host memory (GB/s)"] = best(lambda: window.pull([0], status, [host.numpy()]))
        results["raw pinned host -> device copy_ (GB/s)"] = best(lambda: dev.copy_(host, non_blocking=True))
        results["staging: pull + chunked side-stream copy (GB/s)"] = best(staged)
        if direct:
            results["direct: pull into device memory (GB/s)"] = best(lambda: window.pull([0], status, [dev]))
        else:
            results["direct"] = f"not measured: {support.source}"
        ok = bool(torch.equal(dev, torch.ones(n, device=device)))
        results["pulled values intact"] = ok
    comm.Barrier()
    window.free()
    if comm.rank == 1:
        print(json.dumps({"mib": args.mib, **results}), flush=True)
    return 0


def _loop(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        _need_cuda("loop")
    from mpips.config import ModelConfig
    from mpips.data import LocalSource, open_dataset
    from mpips.models import build_model, loss_and_correct

    data = open_dataset("pytext", None, context=args.gpt_context)
    cfg = ModelConfig(model="gpt", gpt_layers=args.gpt_layers, gpt_width=args.gpt_width, gpt_heads=args.gpt_heads,
                      gpt_context=args.gpt_context)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    model = build_model(cfg, data.spec, 0).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    plan = data.plan(1, args.batch_size, 0)  # the sample order of one mpips worker
    source = LocalSource(data.train, plan, 0)
    count = args.warmup + args.steps
    t0 = time.perf_counter()
    for step in range(count):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        batch = source.batch(*plan.position(step))
        x = torch.from_numpy(batch.x).to(device, non_blocking=True)
        y = torch.from_numpy(batch.y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x)
        loss, _ = loss_and_correct(logits.float(), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    print(json.dumps({"system": f"plain torch loop, 1 {device.type}", "params": params, "batch_size": args.batch_size,
                      "steps": args.steps, "samples_per_s": args.steps * args.batch_size / seconds,
                      "final_loss": float(loss.detach())}), flush=True)
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpips.bench.gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="relative difference of two saved state_dicts")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-5)
    p = sub.add_parser("pull", help="pull bandwidth into GPU memory (mpirun -n 2)")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    loop = sub.add_parser("loop", help="a plain single-GPU bf16 GPT loop: samples/s")
    for name, default in (("gpt-layers", 6), ("gpt-width", 1024), ("gpt-heads", 16), ("gpt-context", 256),
                          ("batch-size", 16), ("steps", 40), ("warmup", 5)):
        loop.add_argument(f"--{name}", type=int, default=default)
    loop.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of the loop only")
    args = parser.parse_args(argv)
    return {"compare": _compare, "pull": _pull, "loop": _loop}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

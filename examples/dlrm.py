"""A DLRM-style click model whose embedding table lives on the parameter servers.

    python -m mpips.data clicks -o clicks.h5                 # 2 M impressions, 20 M keys, Zipf ids
    mpirun -n 4 python examples/dlrm.py clicks.h5            # from the repository root: 2 servers, 2 workers

The table (``--keys`` rows of ``--dim``, 1.2 GiB at the defaults, with Adagrad's state as much
again) is sharded over the servers by key and seeded there row by row: no worker ever holds it.
Each step a worker pulls only the rows its batch touches (the next batch's are asked for while
the dense parameters are pulled: ``emb.prefetch``), and ``opt.step()`` pushes their gradients
with the dense ones. The dense part (``mpips.models.DLRM``: a bottom MLP over the dense
features, the pairwise dot products of the feature vectors, a top MLP) is trained by Adam on
the servers.
Worker 0 then scores the held-out impressions and prints their AUC beside the Bayes AUC the
file's rule allows.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from torch import nn

import mpips
from mpips.data.clicks import ClickLog, auc
from mpips.models import DLRM


def batches(log: ClickLog, steps: int):
    """(ids, dense, label) tensors, ``steps`` of them."""
    for ids, dense, label in itertools.islice(log, steps):
        yield torch.from_numpy(ids), torch.from_numpy(dense), torch.from_numpy(label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="a click log from python -m mpips.data clicks")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=0, help="steps per worker (default: one pass)")
    parser.add_argument("--table-lr", type=float, default=0.05, help="Adagrad on the table")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam on the dense parameters")
    parser.add_argument("--sync", default="bsp", choices=["bsp", "asp", "ssp"])
    args = parser.parse_args()

    job = mpips.init(servers=2, data_servers=0, sync=args.sync)
    if not job.is_worker:
        job.serve()
        return
    log = ClickLog(args.data, "train", args.batch, job.worker_index, job.num_workers)
    keys, fields, dense = (int(log.attrs[k]) for k in ("keys", "fields", "dense"))
    # bsp: every worker takes the same number of steps
    steps = args.steps or log.samples // args.batch // job.num_workers
    torch.manual_seed(0)
    emb = job.embedding(keys, args.dim, optimizer=torch.optim.Adagrad, lr=args.table_lr, init_std=0.01)
    model = DLRM(emb, fields, dense, args.dim)
    opt = job.optimizer(model, torch.optim.Adam, lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    t0, data = time.perf_counter(), batches(log, steps)
    nxt = next(data, None)
    for step in range(steps):
        ids, x, y = nxt
        nxt = next(data, None)
        opt.zero_grad()
        loss = loss_fn(model(ids, x), y)
        loss.backward()
        if nxt is not None:
            emb.prefetch(nxt[0])  # the next batch's rows come while opt.step() pulls the dense ones
        opt.step()
        if job.worker_index == 0 and (step + 1) % max(1, steps // 5) == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    if job.worker_index == 0:
        scores, labels = [], []
        with torch.no_grad(), opt.server_values():  # asp/ssp: the servers' values, not the led ones pulled
            for ids, x, y in batches(ClickLog(args.data, "val", 4096), 10**9):
                scores.append(model(ids, x).numpy()), labels.append(y.numpy())
        held_out = auc(np.concatenate(scores), np.concatenate(labels))
        print(f"held-out AUC {held_out:.4f} (Bayes {log.attrs['bayes_auc']:.4f}) after {steps} steps of"
              f" {args.batch} x {job.num_workers} workers, {steps * args.batch * job.num_workers / seconds:,.0f}"
              f" samples/s", flush=True)
    job.finish()


if __name__ == "__main__":
    main()

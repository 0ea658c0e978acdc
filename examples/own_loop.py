"""Your own training loop: gradient accumulation, a torch LR scheduler and a torch DataLoader.

    mpirun -n 4 python examples/own_loop.py                  # 2 servers, 2 workers
    mpirun -n 4 python examples/own_loop.py --steps 200 --accumulate 4

Every rank runs this script. Workers train the built-in digits (an MLP) with their own
``DataLoader`` over their half of the training split, accumulating gradients over
``--accumulate`` micro-batches per step; AdamW runs on the two parameter servers, and torch's
warm-up + cosine schedule, made over the optimizer ``job.optimizer`` returned, reaches them with
each step. Worker 0 prints the held-out accuracy at the end.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mpips
from mpips.data.builtin import load_builtin


def digits(ids_key: str) -> TensorDataset:
    d = load_builtin("digits")
    ids = d[ids_key]
    return TensorDataset(torch.from_numpy(d["x"][ids]).flatten(1), torch.from_numpy(d["y"][ids]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--batch", type=int, default=16, help="samples per micro-batch per worker")
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()

    job = mpips.init(servers=args.servers, data_servers=0, sync="bsp")
    if not job.is_worker:
        job.serve()
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = job.optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=20)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps - 20)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[20])

    train = digits("train_ids")
    mine = torch.utils.data.Subset(train, range(job.worker_index, len(train), job.num_workers))
    loader = DataLoader(mine, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(job.worker_index))
    batches = iter(loader)
    for _ in range(args.steps):
        opt.zero_grad()
        for _ in range(args.accumulate):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            (nn.functional.cross_entropy(model(x), y) / args.accumulate).backward()
        opt.step()
        sched.step()
    job.finish()  # worker 0's model now holds the servers' final parameters
    if job.worker_index == 0:
        val = digits("val_ids")
        with torch.no_grad():
            accuracy = (model(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean().item()
        print(f"own loop: {args.steps} steps, lr now {opt.param_groups[0]['lr']:.2e},"
              f" held-out accuracy {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()

"""A student trained against a frozen teacher: one model on the servers, one that never leaves the worker.

    mpirun -n 4 python examples/distill.py              # 2 servers, 2 workers

The teacher (a wider MLP, fixed weights, every parameter ``requires_grad=False``) is built the
same on every worker and never registered: it has no optimizer and nothing of it reaches the
servers. The student is registered with ``job.optimizer`` and learns to match the teacher's
outputs (soft targets, KL divergence at temperature 2) on random inputs. Worker 0 prints the
distillation loss over the first and the last 20 steps.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import mpips


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    job = mpips.init(servers=2, data_servers=0, sync="bsp")
    if not job.is_worker:
        job.serve()
        return
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 10)).requires_grad_(False).eval()
    student = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = job.optimizer(student, torch.optim.Adam, lr=3e-3)
    g = torch.Generator().manual_seed(job.worker_index)
    t = 2.0
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, 16, generator=g)
        with torch.no_grad():
            soft = (teacher(x) / t).log_softmax(1)
        loss = nn.functional.kl_div((student(x) / t).log_softmax(1), soft, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    job.finish()
    if job.worker_index == 0:
        print(f"distill: KL(teacher || student) {sum(losses[:20]) / 20:.5f} -> {sum(losses[-20:]) / 20:.5f}",
              flush=True)


if __name__ == "__main__":
    main()

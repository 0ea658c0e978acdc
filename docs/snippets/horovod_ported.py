"""Training on synthetic data, AdamW and a cosine schedule: a Horovod script (horovod_loop.py) and its
mpips port (horovod_ported.py), docs/own-loop.md."""

import torch
from torch import nn

import mpips

STEPS, BATCH = 30, 32


def batch(step, part, parts):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    n = BATCH // parts
    return x[part * n:(part + 1) * n], y[part * n:(part + 1) * n]


job = mpips.init(servers=2, data_servers=0, sync="bsp")
if not job.is_worker:
    raise SystemExit(job.serve())
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = job.optimizer(model, torch.optim.AdamW, lr=3e-4, weight_decay=0.1)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
loss_fn = nn.CrossEntropyLoss()
for step in range(STEPS):
    x, y = batch(step, job.worker_index, job.num_workers)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    sched.step()
if job.worker_index == 0:
    torch.save(model.state_dict(), "model.pt")
job.finish()

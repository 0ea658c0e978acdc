"""Training on synthetic data, AdamW and a cosine schedule: a Horovod script (horovod_loop.py) and its
mpips port (horovod_ported.py), docs/own-loop.md."""

import horovod.torch as hvd
import torch
from torch import nn

STEPS, BATCH = 30, 32


def batch(step, part, parts):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    n = BATCH // parts
    return x[part * n:(part + 1) * n], y[part * n:(part + 1) * n]


hvd.init()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(opt, root_rank=0)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
loss_fn = nn.CrossEntropyLoss()
for step in range(STEPS):
    x, y = batch(step, hvd.rank(), hvd.size())
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    sched.step()
if hvd.rank() == 0:
    torch.save(model.state_dict(), "model.pt")

"""Training on synthetic data: AdamW, a cosine schedule, gradient accumulation (docs/own-loop.md)."""

import torch
from torch import nn

STEPS, ACCUM, BATCH = 30, 4, 32  # steps, micro-batches per step, samples per micro-batch


def micro_batches(step, part=0, parts=1):
    """The ACCUM micro-batches of `step` (synthetic, seeded by the step); this process's share."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(ACCUM, BATCH, 64, generator=g), torch.randint(0, 10, (ACCUM, BATCH), generator=g)
    n = BATCH // parts
    return [(x[i, part * n:(part + 1) * n], y[i, part * n:(part + 1) * n]) for i in range(ACCUM)]


torch.manual_seed(0)  # the same initial model on every process
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
loss_fn = nn.CrossEntropyLoss()
for step in range(STEPS):
    opt.zero_grad()
    for x, y in micro_batches(step):
        (loss_fn(model(x), y) / ACCUM).backward()  # several backward calls accumulate
    opt.step()
    sched.step()
torch.save(model.state_dict(), "model.pt")

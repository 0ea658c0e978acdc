"""A plain single-process torch script: AdamW, warm-up + cosine schedule, gradient accumulation.

    python examples/port/plain_torch.py --out plain.pt

``mpips_port.py`` beside it is the same script ported to mpips (``diff plain_torch.py
mpips_port.py``): run under mpirun with 2 servers and 2 workers it ends with the parameters this
script ends with on the concatenated batch.
"""
import argparse
import sys

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--out", default="model.pt")
args = parser.parse_args()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.steps)
data = torch.Generator().manual_seed(1)
accumulate, batch = 2, 16  # micro-batches per step, samples per micro-batch (all workers)
for step in range(args.steps):
    x = torch.randn(accumulate, batch, 32, generator=data)
    y = torch.randint(0, 10, (accumulate, batch), generator=data)
    opt.zero_grad()
    for k in range(accumulate):
        loss = nn.functional.cross_entropy(model(x[k]), y[k]) / accumulate
        loss.backward()
    opt.step()
    sched.step()
    print(f"step {step} loss {loss.item() * accumulate:.4f}", file=sys.stderr)
torch.save(model.state_dict(), args.out)

"""AdamW, warm-up + cosine schedule, gradient accumulation: a single-process torch script and its port.

    python examples/port/plain_torch.py --out plain.pt                 # one torch process
    mpirun -n 4 python examples/port/mpips_port.py --out port.pt      # 2 servers, 2 workers

``diff plain_torch.py mpips_port.py`` is the whole port (docs/own-loop.md shows it): the port,
under mpirun with 2 servers and 2 workers, ends with the parameters the plain script ends with on
the concatenated batch (tests/test_own_loop.py).
"""
import argparse
import sys

import torch
from torch import nn

import mpips

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--out", default="model.pt")
args = parser.parse_args()
job = mpips.init(servers=2, sync="bsp")  # mpirun -n 4: 2 servers, 2 workers
if not job.is_worker:
    sys.exit(job.serve())
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))
opt = job.optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.steps)
data = torch.Generator().manual_seed(1)
accumulate, batch = 2, 16  # micro-batches per step, samples per micro-batch (all workers)
for step in range(args.steps):
    x = torch.randn(accumulate, batch, 32, generator=data)
    y = torch.randint(0, 10, (accumulate, batch), generator=data)
    x, y = x[:, job.worker_index :: job.num_workers], y[:, job.worker_index :: job.num_workers]  # my half
    opt.zero_grad()
    for k in range(accumulate):
        loss = nn.functional.cross_entropy(model(x[k]), y[k]) / accumulate
        loss.backward()
    opt.step()
    sched.step()
    print(f"step {step} loss {loss.item() * accumulate:.4f}", file=sys.stderr)
job.finish()
if job.worker_index == 0:
    torch.save(model.state_dict(), args.out)

"""An own loop with a backup worker: ``mpirun -n 4 python backup_own_loop.py LOOP`` (tests/test_backup_workers.py).

1 server, 3 workers, ``backup_workers=1``; worker 2 sleeps 30 ms a step. ``LOOP`` ``loader``:
``for x, y in job.loader(...)``, which follows the optimizer when it skips ahead; ``range``: a
fixed ``range(60)`` of steps (of one batch) on every worker, so the slow one goes on alone after the others
stopped. Each worker prints its steps and calls; the lead the held-out accuracy.
"""

import sys
import time

import torch
from torch import nn

import mpips

job = mpips.init(servers=1, data_servers=0, config={"backup_workers": 1, "stall_timeout": 30})
if not job.is_worker:
    sys.exit(job.serve())
torch.manual_seed(0)
w = job.worker_index
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = job.optimizer(model, torch.optim.Adam, lr=3e-3)
loader = job.loader(batch_size=32, steps=60)
calls = 0
if sys.argv[1] == "loader":
    batches = iter(loader)
else:  # the same first batch, 60 times
    first = next(iter(loader))
    batches = (first for _ in range(60))
for x, y in batches:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if w == 2:
        time.sleep(0.03)
    opt.step()
    calls += 1
print(f"worker {w}: position {opt.steps}, {calls} calls", flush=True)
if w == 0:
    with torch.no_grad():
        val_x, val_y = torch.from_numpy(loader.val_x), torch.from_numpy(loader.val_y)
        print(f"held-out accuracy {(model(val_x).argmax(1) == val_y).float().mean().item():.4f}", flush=True)
job.finish()

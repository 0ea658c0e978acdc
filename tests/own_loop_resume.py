"""An own loop that checkpoints and resumes, for tests/test_own_loop.py.

    mpirun -n 4 python own_loop_resume.py OUT [--checkpoint-dir D --checkpoint-every 5 --resume latest ...]

Flags after OUT are mpips' (``mpips.init(config=...)``). Two models and optimizers (Adam with
dropout and a BatchNorm: RNG, buffers and optimizer state all matter), data a function of the
step and the worker, the learning rate set by the loop each step; the loop goes on from
``opt.steps`` after a resume, and worker 0 saves both models' parameters to OUT at the end.
"""

import os
import sys
import time

import torch
from torch import nn

import mpips

STEPS = int(os.environ.get("OWN_LOOP_STEPS", 16))
PAUSE = float(os.environ.get("OWN_LOOP_PAUSE", 0))  # seconds per step: time for a signal to land
out, flags = sys.argv[1], sys.argv[2:]
job = mpips.init(servers=2, sync="bsp", config=flags)
if not job.is_worker:
    sys.exit(job.serve())
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
head = nn.Linear(3, 1)
opt = job.optimizer(net, torch.optim.Adam, lr=0.01)
opt_head = job.optimizer(head, torch.optim.SGD, lr=0.05, momentum=0.9)
try:
    for step in range(opt.steps, STEPS):
        g = torch.Generator().manual_seed(1000 * step + job.worker_index)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - step / STEPS)
        opt.zero_grad()
        opt_head.zero_grad()
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y) + head(logits).pow(2).mean()
        loss.backward()
        opt.step()
        opt_head.step()
        if job.worker_index == 0:
            print(f"step {step + 1}/{STEPS}", flush=True)
        time.sleep(PAUSE)
except mpips.Preempted as stop:
    print(f"worker {job.worker_index}: preempted after step {stop.step}", flush=True)
    job.finish()
    sys.exit(stop.status)
job.finish()
if job.worker_index == 0:
    torch.save({**{f"net.{k}": v for k, v in net.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}, out)

"""Early stopping on a held-out metric computed in the loop.

    mpirun -n 4 python examples/early_stopping.py       # 2 servers, 2 workers

Workers train an MLP on the built-in digits and, every ``--eval-every`` steps, evaluate the
held-out accuracy themselves. In bsp every worker holds the same parameters after a step, so
each computes the same accuracy and takes the same decision, with no message: stop once it has
not improved for ``--patience`` evaluations (or ``--max-steps`` is reached), keeping the best
parameters seen. Worker 0 prints where it stopped and the best accuracy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import mpips
from mpips.data.builtin import load_builtin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    job = mpips.init(servers=2, data_servers=0, sync="bsp")
    if not job.is_worker:
        job.serve()
        return
    d = load_builtin("digits")
    x, y = torch.from_numpy(d["x"]).flatten(1), torch.from_numpy(d["y"])
    train, val = torch.from_numpy(d["train_ids"]), torch.from_numpy(d["val_ids"])
    mine = train[job.worker_index :: job.num_workers]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = job.optimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(job.worker_index)
    best, best_step, best_state, waited = -1.0, 0, None, 0
    step = 0
    while step < args.max_steps:
        ids = mine[torch.randint(0, len(mine), (args.batch,), generator=g)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        step += 1
        if step % args.eval_every:
            continue
        with torch.no_grad():
            accuracy = (model(x[val]).argmax(1) == y[val]).float().mean().item()
        if accuracy > best:
            best, best_step, waited = accuracy, step, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= args.patience:
                break
    job.finish()
    if job.worker_index == 0:
        model.load_state_dict(best_state)
        print(f"early stopping: stopped at step {step} of at most {args.max_steps}; best held-out accuracy"
              f" {best:.4f} at step {best_step}", flush=True)


if __name__ == "__main__":
    main()

"""Own-loop jobs for tests/test_own_loop.py: ``mpirun -n 4 python own_loop_cases.py CASE``.

Each case is a small script of the kind a user writes, with one mistake (or none): the test
checks the job ends at once with one line, and status 2, or trains.
"""

import sys

import torch
from torch import nn

import mpips


class Net(nn.Module):  # defined in __main__ only: the servers never import it
    def __init__(self, width: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(4, width), nn.Linear(width, 2)

    def forward(self, x):
        return self.b(self.a(x).relu())


case = sys.argv[1]
with_data = case.startswith("loader")  # 1 server, 1 data server streaming the built-in digits, 2 workers
sync = {"bad_sync": "bogus", "uneven_ssp": "ssp", "lookahead": "asp"}.get(case, "bsp")
job = mpips.init(servers=1 if with_data else 2, data_servers=1 if with_data else 0, sync=sync,
                 config={"stall_timeout": 30})
if case == "lookahead":  # the workers' own communicator (every rank takes part in the split)
    from mpi4py import MPI

    workers_comm = MPI.COMM_WORLD.Split(0 if job.is_worker else MPI.UNDEFINED, job.worker_index or 0)
if case == "optimizer_on_a_server":
    job.optimizer(Net(), torch.optim.SGD, lr=0.1)
if not job.is_worker:
    job.serve()
    sys.exit(0)
torch.manual_seed(0)
w = job.worker_index
if case == "different_models":
    opt = job.optimizer(Net(8 if w == 0 else 9), torch.optim.SGD, lr=0.1)
elif case == "different_order":
    first, second = (Net(8), Net(16)) if w == 0 else (Net(16), Net(8))
    job.optimizer(first, torch.optim.SGD, lr=0.1)
    job.optimizer(second, torch.optim.SGD, lr=0.1)
elif case == "unimportable":
    job.optimizer(Net(), "no_such_package.optim:Fast", lr=0.1)
elif case == "lbfgs":
    job.optimizer(Net(), torch.optim.LBFGS, lr=0.1)
elif case == "bad_argument":
    job.optimizer(Net(), torch.optim.SGD, lr=-1.0)
elif case == "loader":  # job.loader: the data servers' batches, the loop's own evaluation
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = job.optimizer(model, torch.optim.Adam, lr=3e-3)
    loader = job.loader(batch_size=32, steps=150)
    seen = 0
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        seen += len(y)
    with torch.no_grad():
        val_x, val_y = torch.from_numpy(loader.val_x), torch.from_numpy(loader.val_y)
        accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
    print(f"worker {w}: {opt.steps} steps of {loader.steps} ({loader.steps_per_epoch} per epoch), {seen} samples,"
          f" held-out accuracy {accuracy:.4f}", flush=True)
elif case == "equals_torch":  # two groups, per-group LambdaLR, a branch used on even steps only
    def build() -> nn.Module:
        torch.manual_seed(3)
        return nn.ModuleDict({"a": nn.Linear(4, 8), "b": nn.Linear(8, 2), "even": nn.Linear(8, 2)})

    def forward(m: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
        h = m["a"](x).tanh()
        return m["b"](h) + (m["even"](h) if step % 2 == 0 else 0)

    def groups(m: nn.Module) -> list[dict]:
        return [{"params": [p for n, p in m.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
                {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

    lambdas = [lambda s: 0.9 ** s, lambda s: 1.0 / (1 + s)]  # a different schedule per group
    model = build()
    opt = job.optimizer(model, torch.optim.AdamW, lr=0.02, param_groups=groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    for step in range(20):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(model, x[w::2], step), y[w::2]).backward()
        opt.step()
        sched.step()
    job.finish()
    if w == 0:  # one torch process on the concatenated batch
        ref = build()
        ropt = torch.optim.AdamW(groups(ref), lr=0.02)
        rsched = torch.optim.lr_scheduler.LambdaLR(ropt, lambdas)
        for step in range(20):
            x, y = batch(step)
            ropt.zero_grad()
            for part in range(2):
                (nn.functional.cross_entropy(forward(ref, x[part::2], step), y[part::2]) / 2).backward()
            ropt.step()
            rsched.step()
        with torch.no_grad():
            diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(model.parameters(),
                                                                                  ref.parameters(), strict=True))
        print(f"equals torch: max relative difference {diff:.3g}", flush=True)
    sys.exit(0)
elif case == "crash":  # worker 1's loop raises at its 3rd step, while the others wait in bsp
    model = Net()
    opt = job.optimizer(model, torch.optim.SGD, lr=0.1)
    for step in range(20):
        if w == 1 and step == 3:
            raise RuntimeError("the user's loop failed")
        opt.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
elif case in ("uneven_bsp", "uneven_ssp", "no_finish"):  # worker 1 leaves its loop after 5 steps of 10
    model = Net()
    opt = job.optimizer(model, torch.optim.SGD, lr=0.1)
    for _ in range(5 if w == 1 else 10):
        opt.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
    if case == "no_finish" and w == 1:
        sys.exit(0)  # returns without job.finish()
    print(f"worker {w}: {opt.steps} steps", flush=True)
elif case == "lookahead":  # asp, 2 workers: pulls lead the servers' values by lookahead 2 x (W - 1) updates
    model = Net()
    opt = job.optimizer(model, torch.optim.Adam, lr=0.05)
    g = torch.Generator().manual_seed(w)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > x[:, 1]).long()

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def values() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    for _ in range(5):
        step()
    if w == 1:  # its pushes are applied once opt.step() returns: it waits while worker 0 alone steps
        workers_comm.send(None, dest=0)
        workers_comm.recv(source=0)
    else:
        workers_comm.recv(source=1)
        step()
        with opt.server_values():
            before = values()
        step()  # the only update between the two: worker 0's
        led = values()
        with opt.server_values():
            now = values()
        restored = torch.equal(values(), led)
        moved = float((now - before).abs().max())
        off = float((led - (now + 2 * (now - before))).abs().max()) / moved
        print(f"lookahead: pulled {off:.2e} of a step off the servers' values led by 2 updates; moved {moved:.3g};"
              f" restored after: {restored}", flush=True)
        workers_comm.send(None, dest=1)
elif case == "loader_bad_data":
    job.loader("/no/such/file.h5")
elif case in ("trains", "trains_model_zero_grad"):  # a class from __main__, param groups, a scheduler
    # trains_model_zero_grad: model.zero_grad() sets every .grad to None, backward makes new ones
    model = Net()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = job.optimizer(model, torch.optim.AdamW, lr=0.05,
                        param_groups=[{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    g = torch.Generator().manual_seed(w)
    losses = []
    for _ in range(40):
        x = torch.randn(32, 4, generator=g)
        y = (x[:, 0] > x[:, 1]).long()
        if case == "trains":
            opt.zero_grad()
        else:
            model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    print(f"worker {w}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; groups"
          f" {[(len(g['params']), g['weight_decay'], g['lr']) for g in opt.param_groups]}", flush=True)
job.finish()

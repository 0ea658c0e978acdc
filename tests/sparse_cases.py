"""Sparse-table jobs for tests/test_sparse.py: ``mpirun -n 4 python sparse_cases.py CASE [OUT] [flags]``.

2 servers, 2 workers. ``equal_<opt>``: a 1,000-row table (Adagrad, SGD or SparseAdam) under a
linear head (SGD), 20 bsp steps; worker 0 writes the table and head it ends with to OUT (a .pt
file) and the same model trained by one torch process, ``nn.Embedding(sparse=True)`` on the
concatenated batch, so the test compares the two (Adagrad with the next step's rows prefetched,
SGD with an evaluation forward of other ids between backward and step). The ``bad_*`` cases and ``dense_adam`` make one
mistake each.
``seeded``: the servers' seeded rows (std 0.5) in the sync mode of the flags' ``sync``.
``resume``: the equal_adagrad job with a checkpoint directory (flags after OUT: config keys).
``too_large``: a table of 4x this host's total memory. ``big``: a 20 M x 16 table (1.2 GiB,
seeded on the servers) trained 10 steps on Zipf ids; worker 0 writes its resident memory before
the table and its peak after training to OUT (JSON).
"""

import json
import resource
import sys

import torch
from torch import nn

import mpips

ROWS, DIM, BATCH, STEPS = 1000, 8, 16, 20
TABLE_OPT = {"adagrad": (torch.optim.Adagrad, {"lr": 0.1}), "sgd": (torch.optim.SGD, {"lr": 0.5}),
             "sparseadam": (torch.optim.SparseAdam, {"lr": 0.05})}


class Recommender(nn.Module):
    def __init__(self, emb: nn.Module, dim: int = DIM):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(dim, 1)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1)).squeeze(1)


def batch(step: int, worker: int):
    """Worker ``worker``'s batch of ``step``: 3 skewed ids per sample, a label from the ids."""
    g = torch.Generator().manual_seed(1000 * step + worker)
    ids = (torch.rand(BATCH, 3, generator=g) ** 3 * ROWS).long()
    return ids, (ids[:, 0] % 2).float()


def reference(kind: str, init: torch.Tensor, head: dict, workers: int, steps: int):
    """One torch process: nn.Embedding(sparse=True) over the concatenated batches."""
    emb = nn.Embedding(ROWS, DIM, sparse=True)
    model = Recommender(emb)
    model.head.load_state_dict(head)
    with torch.no_grad():
        emb.weight.copy_(init)
    cls, kw = TABLE_OPT[kind]
    table_opt, head_opt = cls([emb.weight], **kw), torch.optim.SGD(model.head.parameters(), lr=0.1)
    for step in range(steps):
        parts = [batch(step, w) for w in range(workers)]
        ids, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        table_opt.zero_grad(), head_opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(ids), y).backward()
        table_opt.step(), head_opt.step()
    return emb.weight.detach().clone(), {k: v.clone() for k, v in model.head.state_dict().items()}


def resident_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


case = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else None
config = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
steps, kill_at = int(config.pop("steps", STEPS)), config.pop("kill_at", None)  # the case's, not mpips' keys
job = mpips.init(servers=2, data_servers=0, sync=config.pop("sync", "bsp"), config={"stall_timeout": 30, **config})
if not job.is_worker:
    sys.exit(job.serve())
torch.manual_seed(0)
kind = case.removeprefix("equal_") if case.startswith("equal_") else "adagrad"
cls, kw = TABLE_OPT[kind]
init = torch.randn(ROWS, DIM) * 0.1
if case == "dense_adam":  # nn.Embedding(sparse=True) in the dense parameters, with an optimizer torch refuses it to
    job.optimizer(Recommender(nn.Embedding(ROWS, DIM, sparse=True)), torch.optim.Adam, lr=0.1)
if case == "bad_optimizer":
    job.embedding(ROWS, DIM, optimizer=torch.optim.Adam, lr=0.1)
if case == "too_large":
    import os

    host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the same on every worker
    emb = job.embedding(4 * host_memory // (DIM * 4), DIM, optimizer=torch.optim.SGD, lr=0.1)
if case == "big":
    big_rows, big_dim = 20_000_000, 16
    rss0 = resident_mib()
    emb = job.embedding(big_rows, big_dim, optimizer=torch.optim.SGD, lr=0.1, init_std=0.01)
    model = Recommender(emb, big_dim)
    opt = job.optimizer(model, torch.optim.SGD, lr=0.1)
    g = torch.Generator().manual_seed(job.worker_index)
    for _ in range(10):
        ids = (torch.rand(256, 4, generator=g) ** 4 * big_rows).long()  # skewed: most ids small
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(ids), (ids[:, 0] % 2).float()).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    job.finish()
    if job.worker_index == 0:
        with open(out, "w") as f:
            json.dump({"rss_before_mib": rss0, "peak_mib": peak}, f)
    sys.exit(0)
if case in ("seeded", "too_large"):
    emb = emb if case == "too_large" else job.embedding(ROWS, DIM, optimizer=cls, init_std=0.5, **kw)
else:
    emb = job.embedding(ROWS, DIM, optimizer=cls, init=init, **kw)
model = Recommender(emb)
head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
opt = job.optimizer(model, torch.optim.SGD, lr=0.1)
try:
    for step in range(opt.steps, steps):
        ids, y = batch(step, job.worker_index)
        if case == "bad_range" and step == 3:
            ids[0, 0] = ROWS if job.worker_index == 1 else 5
        if case == "bad_negative" and step == 2:
            ids[1, 1] = -4
        if case == "bad_float" and step == 1:
            ids = ids.float()
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(ids), y).backward()
        if case == "equal_sgd":  # an evaluation at the same step between backward and step changes nothing
            with torch.no_grad():
                model(batch(step + 100, job.worker_index)[0])
        if case in ("equal_adagrad", "resume") and step + 1 < steps:
            emb.prefetch(batch(step + 1, job.worker_index)[0])  # the next step's rows, during the dense pull
        opt.step()
        if kill_at == step and job.worker_index == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
except mpips.Preempted as exc:
    job.finish()
    sys.exit(exc.status)
table = emb.state_dict()["weight"]
job.finish()
if job.worker_index == 0 and out:
    result = {"table": table, "head": {k: v.clone() for k, v in model.head.state_dict().items()}}
    if case.startswith("equal_"):
        result["ref_table"], result["ref_head"] = reference(kind, init, head0, job.num_workers, STEPS)
    if case == "seeded":  # the rows each worker's batches touched, and the seed the servers drew the rest from
        result["touched"] = [torch.cat([batch(s, w)[0].reshape(-1) for s in range(steps)]).unique()
                             for w in range(job.num_workers)]
        result["seed"] = job.config.train.seed
    torch.save(result, out)

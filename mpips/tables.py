"""The models a job registered, as one rank holds them; registration over MPI (``job.optimizer``).

A registration is collective over the servers and workers: worker 0 tells the servers one is
coming (a ``CONTROL`` message their serve loop takes), every worker's ``TableSpec``
(``mpips.registration``) is gathered and compared, the servers check they can import its
optimizer, a communicator is made for the model's messages alone, the checkpoint to resume
from is chosen, worker 0 sends each server its shard's initial values, and the server starts
serving it. Bad input at any of these steps is the same on every rank: said once, status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from mpips.checkpoint import Checkpointing, list_checkpoints
from mpips.client import ParameterClient
from mpips.errors import INPUT_ERRORS, agree
from mpips.layout import PSContext
from mpips.models import ModelError
from mpips.registration import TableSpec, resolve_optimizer, spec_mismatch
from mpips.rowserver import RowServer
from mpips.server import ParameterServer
from mpips.shard import ShardPlan
from mpips.sparse import EmbeddingSpec, available_memory, check_fits, init_rows, local_rows
from mpips.startup import choose_pull
from mpips.transport import Tag, recv_chunks, send_control, wait_all

if TYPE_CHECKING:
    from mpips.job import Job

__all__ = ["OPEN_ENDED", "Table", "checkpointing", "context", "plan_of", "register"]

log = logging.getLogger("mpips.job")

OPEN_ENDED = 2**62  # an own loop's steps: as many as the user's loop takes


@dataclass
class Table:
    """One registration as this rank holds it: its communicators and its server or client."""

    comm: MPI.Comm  # a duplicate of the parameter-server communicator: this model's messages only
    server: ParameterServer | None = None
    client: ParameterClient | None = None
    servers: MPI.Comm | None = None  # servers only: a duplicate of their role communicator
    finished: bool = False
    checkpoints: Checkpointing | None = None
    embeddings: list = dataclasses.field(default_factory=list)  # workers: the model's SparseEmbedding modules


def register(job: Job, describe: Callable[[], TableSpec] | None) -> tuple[int, TableSpec]:
    """Worker (``describe`` given) or server: agree on the next registration's spec, check it,
    and set up its communicators; a server also builds its shard and starts serving it."""
    table = len(job.tables)
    if describe is not None and job.index == 0:
        for rank in job.server_ranks:
            send_control(job.ps_comm, rank, ("register", table))
    blocking = job.dog.blocking
    try:
        mine = agree(job.ps_comm, describe if describe is not None else lambda: None, blocking)
        with blocking("job.optimizer: every worker's model and optimizer (allgather over servers and workers)"):
            specs = [s for s in job.ps_comm.allgather(mine) if s is not None]
        problem = spec_mismatch(specs, table)
        if problem:
            raise ModelError(problem)
        spec = specs[0]
        agree(job.ps_comm, (lambda: _check_servable(job, spec)) if job.is_server else (lambda: None), blocking)
    except INPUT_ERRORS as exc:
        raise SystemExit(job.bad_input(exc)) from None
    with blocking("job.optimizer: a communicator for the model (collective over servers and workers)"):
        t = Table(job.ps_comm.Dup())
        if job.is_server:
            t.servers = job.comms.role.Dup()
    job.tables.append(t)
    plan = plan_of(job, spec)
    t.checkpoints = checkpointing(job, t, spec, plan, table)
    if job.is_server:
        init = np.empty(plan.shard_numel(job.index), dtype=np.float32)
        wait_all(recv_chunks(t.comm, init, job.worker_ranks[0], Tag.INIT, job.config.train.chunk_bytes),
                 "worker 0's initial values (job.optimizer)", job.config.train.stall_timeout)
        rows = [_rows_of(job, t, e, i, table) for i, e in enumerate(spec.sparse)]  # worker 0 sends them next
        t.server = ParameterServer(context(job, t, spec, plan), job.index, init, t.servers, batch_size=1)
        with blocking("job.optimizer: the parameter windows (collective over servers and workers)"):
            t.server.start()
        t.server.sparse = [RowServer(t.server, i, e, values)
                           for i, (e, values) in enumerate(zip(spec.sparse, rows, strict=True))]
        resumed = t.checkpoints.server_state(t.server.state_dict())
        if resumed is not None:
            t.server.load_state_dict(resumed)
        t.server.begin_serving()
        if job.index == 0:
            log.info("model %d: %d tensors, %s parameters over %d servers, optimizer %s", table, len(spec.names),
                     f"{plan.numel:,}", job.num_servers, spec.optimizer)
    return table, spec


def _check_servable(job: Job, spec: TableSpec) -> None:
    """A server: it can import the optimizers, and the model's sparse tables fit its memory."""
    resolve_optimizer(spec.optimizer)
    for e in spec.sparse:
        resolve_optimizer(e.optimizer, sparse=True)
    if spec.sparse:
        available = available_memory()
        if available >= 0:
            hosts = job.layout.hosts
            mine = hosts[job.layout.servers[job.index]] if hosts else None
            sharing = sum(1 for r in job.layout.servers if hosts and hosts[r] == mine) or 1
            check_fits(spec.sparse, job.index, job.num_servers, available, sharing)


def _rows_of(job: Job, t: Table, e: EmbeddingSpec, i: int, table: int) -> np.ndarray:
    """This server's initial rows of table ``i``: worker 0's (``init=``) or the seeded ones, made
    in slabs of rows so that no more than one slab is ever held twice."""
    rows = local_rows(e.rows, job.index, job.num_servers)
    out = np.empty((rows, e.dim), dtype=np.float32)
    if e.init == "given":
        wait_all(recv_chunks(t.comm, out, job.worker_ranks[0], Tag.INIT, job.config.train.chunk_bytes),
                 f"worker 0's initial rows of table {e.name}", job.config.train.stall_timeout)
        return out
    slab = max(1, (1 << 22) // e.dim)
    for lo in range(0, rows, slab):
        keys = np.arange(lo, min(rows, lo + slab), dtype=np.int64) * job.num_servers + job.index
        out[lo : lo + len(keys)] = init_rows(keys, e.dim, job.config.train.seed, 1000 * table + i, e.std)
    return out


def plan_of(job: Job, spec: TableSpec) -> ShardPlan:
    """The shard plan of a registered model over the job's servers."""
    return ShardPlan.build(list(zip(spec.names, spec.shapes, strict=True)), job.num_servers)


def context(job: Job, t: Table, spec: TableSpec, plan: ShardPlan) -> PSContext:
    """What the servers and workers of a registered model share."""
    cfg = job.config
    # an own loop: pushes after backward (gradients may accumulate over several backward
    # calls) and whole pulls (the loop may read parameters outside forward)
    train = dataclasses.replace(cfg.train, push_during_backward=False, pull_ahead=False)
    return PSContext(comm=t.comm, servers=job.server_ranks, workers=job.worker_ranks, plan=plan, train=train,
                     optim=cfg.optim, pull=choose_pull(cfg.train.pull), total_steps=OPEN_ENDED,
                     checkpoints=t.checkpoints, compression=cfg.compression, table=spec)


def checkpointing(job: Job, t: Table, spec: TableSpec, plan: ShardPlan, table: int) -> Checkpointing:
    """Registration ``table``'s checkpoints (collective over its communicator): in
    ``checkpoint_dir`` for the first model, ``checkpoint_dir/model-<n>`` for the n-th after it;
    the one to resume from is chosen as the command line chooses it (``resume``)."""
    cfg, c = job.config, job.config.checkpoint
    if c.checkpoint_dir is not None and c.resume == "latest" and table == 0 and job.index == 0 and job.is_worker:
        _align(Path(c.checkpoint_dir))
    if c.checkpoint_dir is not None and table:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            c, checkpoint_dir=os.path.join(c.checkpoint_dir, f"model-{table}"),
            resume=c.resume if c.resume in (None, "latest") else os.path.join(
                os.path.dirname(c.resume), f"model-{table}", os.path.basename(c.resume))))
    counts = {"servers": job.num_servers, "data_servers": len(job.layout.data_servers),
              "workers": job.num_workers}
    with job.dog.blocking("job.optimizer: choosing the checkpoint to resume from (collective over servers and"
                           " workers)"):
        try:
            module = [[name, list(shape), dtype, kind] for name, shape, dtype, kind in spec.module]
            ckpt = Checkpointing.setup(cfg, t.comm, counts, plan, module, OPEN_ENDED, job.preemption)
        except INPUT_ERRORS as exc:
            raise SystemExit(job.bad_input(exc)) from None
    ckpt.bind(t.comm, "server" if job.is_server else "worker", job.index, _OwnLoop())
    return ckpt


def _align(directory: Path) -> None:
    """Before resuming the newest checkpoints of several models: move aside those of steps that
    not every model's directory holds (a job killed between two models' checkpoints of one step),
    so that every model resumes from the same step."""
    dirs = [directory, *sorted(p for p in directory.glob("model-*") if p.is_dir())]
    steps = [{step for step, _ in list_checkpoints(d)} for d in dirs]
    common = set.intersection(*steps) if steps else set()
    newest = max(common, default=-1)
    for d in dirs:
        for step, path in list_checkpoints(d):
            if step > newest:
                aside = d / "not-resumed"
                aside.mkdir(exist_ok=True)
                path.rename(aside / path.name)
                log.warning("%s: moved to %s, as not every model has a checkpoint at step %d", path, aside, step)


class _OwnLoop:
    """The epoch plan of an own loop, for checkpoints: steps only (the loop owns its data)."""

    @staticmethod
    def position(step: int) -> tuple[int, int]:
        return 0, step

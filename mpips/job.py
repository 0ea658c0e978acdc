"""mpips as a library: every rank calls ``mpips.init``; workers run their own loop, servers serve.

    # train.py, run as: mpirun -n 4 python train.py
    import torch
    import mpips

    job = mpips.init(servers=2, data_servers=0, sync="bsp")
    if job.is_worker:
        torch.manual_seed(0)
        model = Net()
        opt = job.optimizer(model, torch.optim.AdamW, lr=3e-4, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        for x, y in my_loader:                 # any iterable; job.worker_index, job.num_workers
            opt.zero_grad()
            loss_fn(model(x), y).backward()    # several backward calls accumulate
            opt.step()                         # push, then pull per the sync mode
            sched.step()
        job.finish()                           # worker 0's models now hold the final parameters
    else:
        job.serve()                            # until every worker has finished

Roles are static (``mpips.layout``): ``servers`` parameter servers, ``data_servers`` data
servers, and the rest workers. ``job.optimizer`` is collective over the servers and workers:
every worker registers its models in the same order with the same shapes (checked: one line),
and the servers build shards and optimizers from that registration alone, never the user's
model (``mpips.registration``); worker 0's initial values are the servers' (so after
``job.optimizer`` every worker holds them, whatever its own seed gave). Several models and
optimizers per job are several registrations (a GAN's generator and discriminator); a model
with no optimizer (a frozen teacher) is not registered at all.

Failures: bad input at a collective step (workers registering different models, an optimizer
class the servers cannot import, LBFGS) is said once in one line and every rank exits with
status 2; ``mpips.init`` installs a ``sys.excepthook`` so that an exception nobody catches on
any rank (in the user's loop too) prints one line naming the rank, host and role and ends the
whole job (status 1; 2 for bad input seen by one rank alone), instead of leaving the others
waiting.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips import stderr_filter
from mpips.checkpoint import Checkpointing, Preemption, list_checkpoints, module_spec
from mpips.client import DistributedOptimizer, FlatModel, ParameterClient, Preempted
from mpips.config import Config, ConfigError
from mpips.cuda_aware import decide
from mpips.data import DatasetHandle, EpochPlan, LocalSource, open_dataset
from mpips.dataserver import RemoteSource, run_data_server
from mpips.errors import INPUT_ERRORS, Reporter, agree, check_launch, speaks, what
from mpips.layout import PSContext, Role, RoleComms, RoleLayout
from mpips.models import ModelError
from mpips.registration import TableSpec, resolve_optimizer, spec_mismatch
from mpips.server import ParameterServer
from mpips.shard import ShardPlan
from mpips.train import _cuda_support, choose_pull, shard_values, total_steps
from mpips.transport import Backoff, StallError, Tag, recv_chunks, send_chunks, wait_all
from mpips.watchdog import Watchdog, abort_job

__all__ = ["Job", "Loader", "init"]

log = logging.getLogger("mpips.job")

OPEN_ENDED = 2**62  # an own loop's steps: as many as the user's loop takes


def init(
    servers: int | None = None,
    data_servers: int | None = None,
    sync: str | None = None,
    *,
    config: Config | dict[str, Any] | Sequence[str] | None = None,
    comm: MPI.Comm | None = None,
    handle_signals: bool = True,
) -> Job:
    """Take this rank's role in a parameter-server job; collective over ``comm`` (every rank calls it).

    Args:
        servers: parameter-server ranks (default: the config's, 1).
        data_servers: data-server ranks (default: the config's where it names them, else 0).
        sync: ``"bsp"``, ``"asp"`` or ``"ssp"`` (default: the config's, bsp).
        config: as ``mpips.fit`` takes it: a ``Config``, a dict of its keys (``{"staleness": 2,
            "stall_timeout": 60}``) or a list of command-line flags.
        comm: the world of this job (default ``MPI.COMM_WORLD``).
        handle_signals: SIGTERM, SIGUSR1 and SIGINT stop the job at the next step boundary
            (``DistributedOptimizer.step`` raises ``mpips.Preempted``).

    Returns:
        This rank's ``Job``.

    Raises:
        SystemExit: status 2 on every rank after bad input (said once, in one line).
    """
    from mpips.api import _config

    comm = comm if comm is not None else MPI.COMM_WORLD
    reporter = Reporter(comm, speaks(comm.Get_rank(), comm.Get_size(), os.environ), MPI.Get_processor_name())
    try:
        cfg = _config(config, None, None, None, None)
        explicit = (isinstance(config, Config) or (isinstance(config, dict) and "data_servers" in _flat(config))
                    or (isinstance(config, list | tuple) and "--data-servers" in config))
        cfg.roles.servers = servers if servers is not None else cfg.roles.servers
        cfg.roles.data_servers = data_servers if data_servers is not None else (
            cfg.roles.data_servers if explicit else 0)
        cfg.train.sync = sync if sync is not None else cfg.train.sync
        cfg.validate()
        reporter.debug = cfg.train.debug
        check_launch(comm.Get_size(), os.environ, MPI.get_vendor())
        hosts = comm.allgather(MPI.Get_processor_name())
        layout = RoleLayout.from_counts(comm.Get_size(), cfg.roles.servers, cfg.roles.data_servers, hosts)
    except INPUT_ERRORS as exc:
        raise SystemExit(reporter.bad_input(exc)) from None
    if MPI.get_vendor()[0] == "Open MPI" and comm.Get_size() > 1:
        stderr_filter.install()  # a dead peer must not flood the terminal
    job = Job(cfg, comm, layout, reporter, Preemption.install() if handle_signals else Preemption())
    sys.excepthook = job._excepthook
    if comm.Get_rank() == 0:
        print(layout.describe(), flush=True)
    return job


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


@dataclass
class _Table:
    """One registration as this rank holds it: its communicators and its server or client."""

    comm: MPI.Comm  # a duplicate of the parameter-server communicator: this model's messages only
    server: ParameterServer | None = None
    client: ParameterClient | None = None
    servers: MPI.Comm | None = None  # servers only: a duplicate of their role communicator
    finished: bool = False
    checkpoints: Checkpointing | None = None


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


class Loader:
    """A worker's batches of the run's steps (made by ``Job.loader``).

    Iterating it yields ``(x, y)`` tensors for each global step from the optimizer's position to
    ``steps`` (across epochs: ``steps_per_epoch`` steps make one), then closes the source.

    Attributes:
        steps: the run's global steps.
        steps_per_epoch: steps in one epoch over the training split.
        val_x, val_y: the held-out split (numpy arrays), for the loop's own evaluation.
    """

    def __init__(self, source: Any, plan: EpochPlan, steps: int, data: DatasetHandle, start: Callable[[], int]):
        self.source, self.plan, self.steps, self._start = source, plan, steps, start
        self.steps_per_epoch = plan.steps_per_epoch
        self.val_x, self.val_y = data.val_x, data.val_y

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self._start(), self.steps):
            batch = self.source.batch(*self.plan.position(step))
            yield torch.from_numpy(batch.x), torch.from_numpy(batch.y)
        self.close()

    def close(self) -> None:
        """Tell the data servers this worker is done (also done by ``job.finish``)."""
        self.source.close()


class _OwnLoop:
    """The epoch plan of an own loop, for checkpoints: steps only (the loop owns its data)."""

    @staticmethod
    def position(step: int) -> tuple[int, int]:
        return 0, step


class Job:
    """This rank's part of a parameter-server job (made by ``mpips.init``).

    Attributes:
        config: the job's ``mpips.config.Config``.
        comm: the world.
        layout: which rank has which role (``mpips.layout.RoleLayout``).
        role: ``"worker"``, ``"server"`` or ``"data server"``.
        index: this rank's index within its role.
    """

    def __init__(self, cfg: Config, comm: MPI.Comm, layout: RoleLayout, reporter: Reporter, preemption: Preemption):
        self.config, self.comm, self.layout, self.reporter, self.preemption = cfg, comm, layout, reporter, preemption
        rank = comm.Get_rank()
        self._role = layout.role_of(rank)
        self.role, self.index = self._role.value.replace("-", " "), layout.index_of(rank)
        self.who = {"role": f"{self.role} {self.index}"}
        self.dog = Watchdog(comm, cfg.train.stall_timeout, self.who)
        with self.dog.blocking("mpips.init: splitting the communicators (collective over the world)"):
            self.comms = RoleComms.split(comm, layout)
            self.ps_comm = comm.Split(0 if self._role != Role.DATA else 1, rank)  # servers and workers
            self.data_comm = comm.Split(0 if self._role != Role.SERVER else 1, rank)  # workers and data servers
        members = sorted(layout.servers + layout.workers)
        self._servers = [members.index(r) for r in layout.servers]  # ranks in ps_comm
        self._workers = [members.index(r) for r in layout.workers]
        self._tables: list[_Table] = []
        self._loaders: list[Loader] = []
        self._finished = False

    # -- who am I ----------------------------------------------------------------------------
    @property
    def is_worker(self) -> bool:
        return self._role == Role.WORKER

    @property
    def is_server(self) -> bool:
        return self._role == Role.SERVER

    @property
    def is_data_server(self) -> bool:
        return self._role == Role.DATA

    @property
    def worker_index(self) -> int | None:
        """This worker's index, 0 .. num_workers - 1 (None on other roles): shard your data by it."""
        return self.index if self.is_worker else None

    @property
    def num_workers(self) -> int:
        return len(self.layout.workers)

    @property
    def num_servers(self) -> int:
        return len(self.layout.servers)

    # -- workers -----------------------------------------------------------------------------
    def optimizer(self, model: torch.nn.Module, optimizer: type[torch.optim.Optimizer] | str, *,
                  param_groups: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> DistributedOptimizer:
        """Register ``model`` with the servers and get the optimizer that trains it there.

        Collective over the servers and workers: every worker calls it for the same models in the
        same order. The servers take worker 0's initial values and build ``optimizer`` over their
        shards; every worker then holds those values.

        Args:
            model: an ``nn.Module`` on this worker's device; its trainable parameters
                (``requires_grad``) share one dtype. Build it before, and do not move it after.
            optimizer: any ``torch.optim.Optimizer`` class, or ``"package.module:Class"``,
                importable on the servers; not LBFGS or SparseAdam (they cannot run shard by shard).
            param_groups: parameter groups as torch takes them (``[{"params": [...], "weight_decay":
                0.1}, ...]``, every trainable parameter in one); default: all in one group.
            **kwargs: the optimizer's keyword arguments (``lr=3e-4``, ...).

        Returns:
            A ``DistributedOptimizer``: use it as the torch optimizer of ``model``.
        """
        if not self.is_worker:
            raise ConfigError(f"job.optimizer is for workers, and this rank is {self.role} {self.index}: call it under"
                              " `if job.is_worker:` and job.serve() on the other ranks")
        if self._finished:
            raise ConfigError("job.optimizer after job.finish()")
        local: dict[str, Any] = {}

        def describe() -> TableSpec:
            cls = resolve_optimizer(optimizer)
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not trainable:
                raise ModelError("the model given to job.optimizer has no trainable parameters")
            try:
                local["opt"] = cls(list(param_groups) if param_groups is not None else [p for _, p in trainable],
                                   **kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{cls.__name__}(...) refused its arguments: {exc}") from None
            return TableSpec.of(trainable, local["opt"], module_spec(FlatModel.module_state_of(model)))

        table, spec = self._register(describe)
        t = self._tables[table]
        cfg = self.config
        device = next(p.device for _, p in model.named_parameters() if p.requires_grad)
        comp = cfg.compression
        needs_host = " and ".join(f for f in (f"--compress {comp.compress}" if comp.compress != "none" else "",
                                              f"--pull-codec {comp.pull_codec}" if comp.pull_codec != "fp32" else "")
                                  if f)
        path = decide(cfg.train.cuda_aware, _cuda_support(), device.type, needs_host).path if device.type == "cuda" \
            else "host"
        plan = self._plan(spec)
        flat = FlatModel(model, plan, device, path=path)
        if self.index == 0:  # the servers' initial values are worker 0's
            sends = [r for s, rank in enumerate(self._servers)
                     for r in send_chunks(t.comm, shard_values(model, plan, s), rank, Tag.INIT, cfg.train.chunk_bytes)]
            wait_all(sends, "the servers to take the initial values", cfg.train.stall_timeout)
        client = ParameterClient(self._context(t, spec, plan), self.index, flat)
        with self.dog.blocking("job.optimizer: the parameter windows (collective over servers and workers)"):
            client.start()
        resumed = client.checkpoints.worker_state(client.state_dict())
        if resumed is not None:  # position, torch's RNG, buffers: the loop goes on from opt.steps
            client.load_state_dict(resumed)
        t.client = client
        opt = DistributedOptimizer(client, local["opt"], spec.hyper(), self._stopped)
        if client.await_step(ahead=False) is None:  # every worker now holds the servers' values
            raise Preempted(client.position, self._stopped(client.position))
        return opt

    def finish(self) -> None:
        """This worker is done: its models' servers stop once every worker finished; worker 0's
        models then hold the servers' final parameters. Collective over servers and workers."""
        if not self.is_worker:
            raise ConfigError(f"job.finish is for workers; this rank is {self.role} {self.index}: call job.serve()")
        if self._finished:
            return
        self._finished = True
        lead = self._workers[0]
        for t in self._tables:
            with self.dog.blocking("job.finish: the final parameters from every server (collective over servers and"
                                   " workers)"):
                final = t.client.finish(lead=lead)
            if final is not None:
                t.client.flat.load_wire(final)
            t.comm.Free()
        for loader in self._loaders:
            loader.close()
        for rank in self._servers:
            self.ps_comm.send(("finish", self.index), dest=rank, tag=Tag.CONTROL)
        for rank in self.layout.data_servers:
            self.comm.send(("finish", self.index), dest=rank, tag=Tag.CONTROL)
        self.dog.close()

    def _stopped(self, step: int) -> int:
        """The exit status after a stop on a signal at ``step`` (75: checkpointed, requeue)."""
        return max(t.client.checkpoints.exit_status() for t in self._tables)

    # -- servers -----------------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until every worker has called ``finish``: apply the pushes of every registered
        model, take new registrations. Parameter servers and data servers call this.

        Returns:
            The job's exit status: 0, or 75 (checkpointed) / 143 after a stop on a signal
            (``sys.exit(job.serve())`` ends a server's process as the workers end theirs).
        """
        if self.is_worker:
            raise ConfigError(f"job.serve is for servers; this rank is worker {self.index}: train, then job.finish()")
        if self.is_data_server:
            return self._serve_data()
        finished: set[int] = set()
        backoff, quiet_since = Backoff.for_messages(), MPI.Wtime()
        while len(finished) < self.num_workers or any(not t.finished for t in self._tables):
            moved = False
            for t in self._tables:
                if not t.finished and t.server.serving:
                    moved |= t.server.poll()
            for t in self._tables:  # in registration order, as the workers finish them
                if t.finished:
                    continue
                if t.server.serving:
                    break
                with self.dog.blocking("job.serve: sending the final shard to worker 0 (collective over servers and"
                                       " workers)"):
                    t.server.finish(lead=self._workers[0])
                t.comm.Free()
                t.servers.Free()
                t.finished = moved = True
            message = self.ps_comm.improbe(source=MPI.ANY_SOURCE, tag=Tag.CONTROL)
            if message is not None:
                kind, who = message.recv()
                if kind == "register":
                    self._register(None)
                else:
                    finished.add(who)
                moved = True
            if moved:
                backoff.reset()
                quiet_since = MPI.Wtime()
                continue
            open_step = next((t.server for t in self._tables if not t.finished and t.server.step_open), None)
            if open_step is not None and MPI.Wtime() - quiet_since > self.config.train.stall_timeout:
                raise StallError(open_step.stall_message())
            backoff.wait()
        self.dog.close()
        return max((t.server.checkpoints.exit_status() for t in self._tables), default=0)

    def loader(self, data: str | Sequence[str] | None = None, *, batch_size: int | None = None,
               steps: int | None = None, epochs: float | None = None) -> Loader:
        """This worker's batches of the job's dataset, streamed by the data servers (or read by the
        workers themselves without data servers), in the order of ``mpips.data.EpochPlan``.

        Collective over the workers and data servers: every worker calls it with the same arguments.

        Args:
            data: HDF5 training data as ``fit`` takes it (a file of ``python -m mpips.data prepare``,
                or files read in place with the config's ``x_key``/``y_key``); default: the config's
                (the built-in digits).
            batch_size: samples per worker per step (default: the config's).
            steps: global steps (default: the config's, else ``epochs`` over the training split).
            epochs: epochs when ``steps`` is not given (default: the config's).

        Returns:
            A ``Loader``: one pass yields ``(x, y)`` tensors for each step from ``opt.steps`` of the
            first registered optimizer (0 before any: a resumed run goes on where it stopped).
        """
        if not self.is_worker:
            raise ConfigError(f"job.loader is for workers; this rank is {self.role} {self.index}: call job.serve()")
        request = {"data": data if data is None or isinstance(data, str) else ",".join(map(str, data)),
                   "batch_size": batch_size, "steps": steps, "epochs": epochs}
        if self.index == 0:
            for rank in self.layout.data_servers:
                self.comm.send(("loader", request), dest=rank, tag=Tag.CONTROL)
        source, plan, total, handle = self._open_data(request)
        loader = Loader(source, plan, total, handle,
                        lambda: self._tables[0].client.position if self._tables else 0)
        self._loaders.append(loader)
        return loader

    def _open_data(self, request: dict[str, Any]) -> tuple[Any, EpochPlan, int, DatasetHandle]:
        """Collective over workers and data servers: open the dataset, plan the epochs; a data
        server serves its partitions until every worker's source is closed."""
        cfg = copy.deepcopy(self.config)
        cfg.data.data = request["data"] if request["data"] is not None else cfg.data.data
        cfg.data.batch_size = request["batch_size"] or cfg.data.batch_size
        cfg.train.steps = request["steps"] if request["steps"] is not None else cfg.train.steps
        cfg.train.epochs = request["epochs"] if request["epochs"] is not None else cfg.train.epochs
        d = cfg.data
        try:
            cfg.validate()
            with self.dog.blocking("job.loader: opening the dataset (collective over workers and data servers)"):
                data = open_dataset(d.dataset, d.data, context=cfg.model.gpt_context, comm=self.data_comm,
                                    data_dir=d.data_dir, data_servers=len(self.layout.data_servers),
                                    replicas=d.replicas, cache_mb=d.cache_mb, x_key=d.x_key, y_key=d.y_key,
                                    task=d.task, num_classes=d.num_classes, val_data=d.val_data)
        except INPUT_ERRORS as exc:  # the same on every worker and data server; the servers wait elsewhere
            if self.data_comm.Get_rank() == 0:
                print(f"mpips: bad {what(exc)}: {exc}", file=sys.stderr, flush=True)
            self.data_comm.Barrier()
            abort_job(self.comm, 2)
        plan = data.plan(self.num_workers, d.batch_size, cfg.train.seed)
        total = total_steps(cfg, plan)
        if self.is_data_server:
            run_data_server(cfg, self.layout, self.comms, data, plan, total)
            return None, plan, total, data
        if self.layout.data_servers:
            source = RemoteSource.for_job(self.comm, cfg, self.layout, self.index, plan, data, total)
        else:
            source = LocalSource(data.train, plan, self.index)
        return source, plan, total, data

    def _serve_data(self) -> int:
        """A data server: serve each ``job.loader`` the workers open, until every worker finished."""
        finished: set[int] = set()
        backoff = Backoff.for_messages()
        while len(finished) < self.num_workers:
            message = self.comm.improbe(source=MPI.ANY_SOURCE, tag=Tag.CONTROL)
            if message is None:
                backoff.wait()
                continue
            backoff.reset()
            kind, what_ = message.recv()
            if kind == "loader":
                self._open_data(what_)
            else:
                finished.add(what_)
        self.dog.close()
        return 0

    # -- registration (collective over servers and workers) ----------------------------------
    def _register(self, describe: Callable[[], TableSpec] | None) -> tuple[int, TableSpec]:
        """Worker (``describe`` given) or server: agree on the next registration's spec, check it,
        and set up its communicators; a server also builds its shard and starts serving it."""
        table = len(self._tables)
        if describe is not None and self.index == 0:
            for rank in self._servers:
                self.ps_comm.send(("register", table), dest=rank, tag=Tag.CONTROL)
        blocking = self.dog.blocking
        try:
            mine = agree(self.ps_comm, describe if describe is not None else lambda: None, blocking)
            with blocking("job.optimizer: every worker's model and optimizer (allgather over servers and workers)"):
                specs = [s for s in self.ps_comm.allgather(mine) if s is not None]
            problem = spec_mismatch(specs, table)
            if problem:
                raise ModelError(problem)
            spec = specs[0]
            agree(self.ps_comm, (lambda: resolve_optimizer(spec.optimizer)) if self.is_server else (lambda: None),
                  blocking)
        except INPUT_ERRORS as exc:
            raise SystemExit(self._bad_input(exc)) from None
        with blocking("job.optimizer: a communicator for the model (collective over servers and workers)"):
            t = _Table(self.ps_comm.Dup())
            if self.is_server:
                t.servers = self.comms.role.Dup()
        self._tables.append(t)
        t.checkpoints = self._checkpointing(t, spec, self._plan(spec), table)
        if self.is_server:
            plan = self._plan(spec)
            init = np.empty(plan.shard_numel(self.index), dtype=np.float32)
            wait_all(recv_chunks(t.comm, init, self._workers[0], Tag.INIT, self.config.train.chunk_bytes),
                     "worker 0's initial values (job.optimizer)", self.config.train.stall_timeout)
            t.server = ParameterServer(self._context(t, spec, plan), self.index, init, t.servers, batch_size=1)
            with blocking("job.optimizer: the parameter windows (collective over servers and workers)"):
                t.server.start()
            resumed = t.checkpoints.server_state(t.server.state_dict())
            if resumed is not None:
                t.server.load_state_dict(resumed)
            t.server.begin_serving()
            if self.index == 0:
                log.info("model %d: %d tensors, %s parameters over %d servers, optimizer %s", table, len(spec.names),
                         f"{plan.numel:,}", self.num_servers, spec.optimizer)
        return table, spec

    def _plan(self, spec: TableSpec) -> ShardPlan:
        return ShardPlan.build(list(zip(spec.names, spec.shapes, strict=True)), self.num_servers)

    def _context(self, t: _Table, spec: TableSpec, plan: ShardPlan) -> PSContext:
        cfg = self.config
        # an own loop: pushes after backward (gradients may accumulate over several backward
        # calls) and whole pulls (the loop may read parameters outside forward)
        train = dataclasses.replace(cfg.train, push_during_backward=False, pull_ahead=False)
        return PSContext(comm=t.comm, servers=self._servers, workers=self._workers, plan=plan, train=train,
                         optim=cfg.optim, pull=choose_pull(cfg.train.pull), total_steps=OPEN_ENDED,
                         checkpoints=t.checkpoints, compression=cfg.compression, table=spec)

    def _checkpointing(self, t: _Table, spec: TableSpec, plan: ShardPlan, table: int) -> Checkpointing:
        """Registration ``table``'s checkpoints (collective over its communicator): in
        ``checkpoint_dir`` for the first model, ``checkpoint_dir/model-<n>`` for the n-th after it;
        the one to resume from is chosen as the command line chooses it (``resume``)."""
        cfg, c = self.config, self.config.checkpoint
        if c.checkpoint_dir is not None and c.resume == "latest" and table == 0 and self.index == 0 and self.is_worker:
            _align(Path(c.checkpoint_dir))
        if c.checkpoint_dir is not None and table:
            cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
                c, checkpoint_dir=os.path.join(c.checkpoint_dir, f"model-{table}"),
                resume=c.resume if c.resume in (None, "latest") else os.path.join(
                    os.path.dirname(c.resume), f"model-{table}", os.path.basename(c.resume))))
        counts = {"servers": self.num_servers, "data_servers": len(self.layout.data_servers),
                  "workers": self.num_workers}
        with self.dog.blocking("job.optimizer: choosing the checkpoint to resume from (collective over servers and"
                               " workers)"):
            try:
                module = [[name, list(shape), dtype, kind] for name, shape, dtype, kind in spec.module]
                ckpt = Checkpointing.setup(cfg, t.comm, counts, plan, module, OPEN_ENDED, self.preemption)
            except INPUT_ERRORS as exc:
                raise SystemExit(self._bad_input(exc)) from None
        ckpt.bind(t.comm, "server" if self.is_server else "worker", self.index, _OwnLoop())
        return ckpt

    # -- failures ----------------------------------------------------------------------------
    def _bad_input(self, exc: BaseException) -> int:
        """Collective bad input among servers and workers: said once; every one of them exits 2."""
        if self.layout.data_servers:  # they wait elsewhere: end the whole job
            if self.ps_comm.Get_rank() == 0:
                print(f"mpips: bad {what(exc)}: {exc}", file=sys.stderr, flush=True)
            self.ps_comm.Barrier()
            abort_job(self.comm, 2)
        self.dog.close()
        return self.reporter.bad_input(exc)

    def _excepthook(self, kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        """An exception nobody caught, on this rank: one line, then the whole job ends.

        ``Preempted`` that the loop did not catch: this worker finishes (the servers stop once
        every worker has) and exits with its status (75: requeue)."""
        if isinstance(exc, Preempted) and self.is_worker:
            print(f"mpips: worker {self.index}: {exc}", file=sys.stderr, flush=True)
            self.finish()
            MPI.Finalize()
            os._exit(exc.status)
        where = f"rank {self.comm.Get_rank()} (host {MPI.Get_processor_name()}, {self.who['role']})"
        if isinstance(exc, INPUT_ERRORS):
            print(f"mpips: bad {what(exc)} on {where}: {exc}", file=sys.stderr, flush=True)
            abort_job(self.comm, 2)
        traceback.print_exception(kind, exc, tb, file=sys.stderr)
        print(f"mpips: FATAL on {where}: {kind.__name__}: {exc}", file=sys.stderr, flush=True)
        abort_job(self.comm, 1)

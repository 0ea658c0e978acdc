"""mpips as a library: every rank calls ``mpips.init``; workers run their own loop, servers serve.

    # train.py, run as: mpirun -n 4 python train.py
    import sys

    import torch
    import mpips

    job = mpips.init(servers=2, data_servers=0, sync="bsp")
    if job.is_worker:
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
        sys.exit(job.serve())                  # until every worker has finished; the job's status

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

import atexit
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from mpi4py import MPI

from mpips import stderr_filter
from mpips.checkpoint import Preemption, module_spec
from mpips.client import DistributedOptimizer, FlatModel, ParameterClient, Preempted
from mpips.client.embedding import RowClient, SparseEmbedding
from mpips.client.loader import Loader, open_data
from mpips.config import Config, ConfigError, from_flat
from mpips.cuda_aware import decide
from mpips.errors import INPUT_ERRORS, Reporter, check_launch, speaks, what
from mpips.layout import Role, RoleComms, RoleLayout
from mpips.models import ModelError
from mpips.registration import TableSpec, resolve_optimizer
from mpips.sparse import EmbeddingSpec, sparse_step
from mpips.startup import cuda_support, shard_values
from mpips.tables import Table, context, plan_of, register
from mpips.transport import Backoff, StallError, Tag, poll_control, send_chunks, send_control, wait_all
from mpips.watchdog import Watchdog, abort_job

__all__ = ["Job", "init"]

log = logging.getLogger("mpips.job")


def _refuse_sparse_gradients(model: torch.nn.Module, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    """An ``nn.Embedding(sparse=True)`` in the model's dense parameters with an optimizer torch
    would refuse its sparse gradients to: refused as torch refuses it (mpips would otherwise
    train on the densified gradient, moving every row each step)."""
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            _, why = sparse_step(cls, kwargs)
            if why:
                raise ConfigError(f"{name} is an {type(m).__name__}(sparse=True), and {cls.__name__} cannot step its"
                                  f" sparse gradients (torch: {why}): hold the table on the servers with"
                                  " job.embedding(...), or use sparse=False")
            return


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
        named = isinstance(config, dict) and ("data_servers" in config or "data_servers" in config.get("roles", {}))
        explicit = (isinstance(config, Config) or named
                    or (isinstance(config, list | tuple) and "--data-servers" in config))
        given = {"servers": servers, "data_servers": data_servers if data_servers is not None or explicit else 0,
                 "sync": sync}
        cfg = from_flat({k: v for k, v in given.items() if v is not None}, cfg).validate()
        reporter.debug = cfg.train.debug
        check_launch(MPI.COMM_WORLD.Get_size(), os.environ, MPI.get_vendor())  # the launch, not comm
        hosts = comm.allgather(MPI.Get_processor_name())
        layout = RoleLayout.from_counts(comm.Get_size(), cfg.roles.servers, cfg.roles.data_servers, hosts,
                                    cfg.train.backup_workers)
    except INPUT_ERRORS as exc:
        raise SystemExit(reporter.bad_input(exc)) from None
    if MPI.get_vendor()[0] == "Open MPI" and comm.Get_size() > 1:
        stderr_filter.install()  # a dead peer must not flood the terminal
    job = Job(cfg, comm, layout, reporter, Preemption.install() if handle_signals else Preemption())
    sys.excepthook = job._excepthook
    atexit.register(job._at_exit)
    if comm.Get_rank() == 0:
        print(layout.describe(), flush=True)
    return job


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
        self.server_ranks = [members.index(r) for r in layout.servers]  # ranks in ps_comm
        self.worker_ranks = [members.index(r) for r in layout.workers]
        self.tables: list[Table] = []
        self._loaders: list[Loader] = []
        self._finished = False  # worker: job.finish() returned; server: job.serve() returned
        self._failed = False  # bad input was said: every rank exits 2

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
            _refuse_sparse_gradients(model, cls, kwargs)
            embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseEmbedding)]
            for n, m in embeddings:
                if m.client is not None:
                    raise ModelError(f"embedding {n} is registered already (another job.optimizer's model holds it)")
            if embeddings and self.config.train.backup_workers:
                raise ConfigError(f"embedding {embeddings[0][0]}: sparse tables wait for every worker's rows of a step;"
                                  " they cannot run with --backup-workers")
            local["embeddings"] = [m for _, m in embeddings]
            spec = TableSpec.of(trainable, local["opt"], module_spec(FlatModel.module_state_of(model)))
            return dataclasses.replace(spec, sparse=tuple(dataclasses.replace(m.spec, name=n) for n, m in embeddings))

        table, spec = register(self, describe)
        t = self.tables[table]
        cfg = self.config
        device = next(p.device for _, p in model.named_parameters() if p.requires_grad)
        comp = cfg.compression
        needs_host = " and ".join(f for f in (f"--compress {comp.compress}" if comp.compress != "none" else "",
                                              f"--pull-codec {comp.pull_codec}" if comp.pull_codec != "fp32" else "")
                                  if f)
        path = decide(cfg.train.cuda_aware, cuda_support(), device.type, needs_host).path if device.type == "cuda" \
            else "host"
        plan = plan_of(self, spec)
        flat = FlatModel(model, plan, device, path=path)
        if self.index == 0:  # the servers' initial values are worker 0's
            sends = [r for s, rank in enumerate(self.server_ranks)
                     for r in send_chunks(t.comm, shard_values(model, plan, s), rank, Tag.INIT, cfg.train.chunk_bytes)]
            for e, m in zip(spec.sparse, local["embeddings"], strict=True):
                if e.init == "given":
                    sends += [r for s, rank in enumerate(self.server_ranks)
                              for r in send_chunks(t.comm, m.init[s :: self.num_servers].float().contiguous().numpy(),
                                                   rank, Tag.INIT, cfg.train.chunk_bytes)]
            wait_all(sends, "the servers to take the initial values", cfg.train.stall_timeout)
        client = ParameterClient(context(self, t, spec, plan), self.index, flat)
        for i, (e, m) in enumerate(zip(spec.sparse, local["embeddings"], strict=True)):
            m.spec, m.init = e, None
            m.client = RowClient(t.comm, self.server_ranks, i, e, lambda c=client: c.position, comp.pull_codec,
                                 comp.compress if comp.compress in ("fp16", "bf16") else "fp32",
                                 cfg.train.chunk_bytes, cfg.train.stall_timeout)
        t.embeddings = local["embeddings"]
        with self.dog.blocking("job.optimizer: the parameter windows (collective over servers and workers)"):
            client.start()
        resumed = client.checkpoints.worker_state(client.state_dict())
        if resumed is not None:  # position, torch's RNG, buffers: the loop goes on from opt.steps
            client.load_state_dict(resumed)
        t.client = client
        opt = DistributedOptimizer(client, local["opt"], spec.hyper(), self._stopped, t.embeddings)
        if client.await_step(ahead=False) is None:  # every worker now holds the servers' values
            raise Preempted(client.position, self._stopped(client.position))
        return opt

    def embedding(self, num_embeddings: int, embedding_dim: int, *,
                  optimizer: type[torch.optim.Optimizer] | str, init: torch.Tensor | None = None,
                  init_std: float = 1.0, **kwargs: Any) -> SparseEmbedding:
        """A sparse table held by the parameter servers, used in a model as ``nn.Embedding``.

        Not collective: the table is registered with the model that contains it, at that
        model's ``job.optimizer`` (every worker builds the same tables in the same models). Its
        optimizer steps at that optimizer's ``step()``, on the rows the step touched only.

        Args:
            num_embeddings, embedding_dim: the table's rows and row width.
            optimizer: ``torch.optim.SGD``, ``Adagrad`` or ``SparseAdam`` (any class torch lets
                step sparse gradients), or ``"package.module:Class"``.
            init: float32 [rows, dim] initial values (a small table; worker 0's are used); default:
                ``init_std`` times seeded standard normal values, made by the servers row by row
                (``mpips.sparse.init_rows``: a function of the seed, table and key alone).
            init_std: the standard deviation of the seeded values (``nn.Embedding``'s is 1).
            **kwargs: the optimizer's keyword arguments (``lr=0.05``, ...).

        Returns:
            A ``SparseEmbedding`` module.
        """
        if not self.is_worker:
            raise ConfigError(f"job.embedding is for workers, and this rank is {self.role} {self.index}: call it"
                              " under `if job.is_worker:`")
        spec = EmbeddingSpec.of(num_embeddings, embedding_dim, optimizer, kwargs,
                                "seed" if init is None else "given", init_std)
        if init is not None:
            if not isinstance(init, torch.Tensor) or tuple(init.shape) != (num_embeddings, embedding_dim):
                raise ConfigError(f"job.embedding: init must be a tensor of shape ({num_embeddings},"
                                  f" {embedding_dim}), got {getattr(init, 'shape', type(init).__name__)}")
            init = init.detach().to("cpu", torch.float32)
        return SparseEmbedding(spec, init)

    def finish(self) -> None:
        """This worker is done: its models' servers stop once every worker finished; worker 0's
        models then hold the servers' final parameters. Collective over servers and workers."""
        if not self.is_worker:
            raise ConfigError(f"job.finish is for workers; this rank is {self.role} {self.index}: call job.serve()")
        if self._finished:
            return
        self._finished = True
        lead = self.worker_ranks[0]
        for t in self.tables:
            for emb in t.embeddings:
                emb.finish()
            with self.dog.blocking("job.finish: the final parameters from every server (collective over servers and"
                                   " workers)"):
                final = t.client.finish(lead=lead)
            if final is not None:
                t.client.flat.load_wire(final)
            t.comm.Free()
        for loader in self._loaders:
            loader.close()
        for rank in self.server_ranks:
            send_control(self.ps_comm, rank, ("finish", self.index))
        for rank in self.layout.data_servers:
            send_control(self.comm, rank, ("finish", self.index))
        self.dog.close()

    def _stopped(self, step: int) -> int:
        """The exit status after a stop on a signal at ``step`` (75: checkpointed, requeue)."""
        return max(t.client.checkpoints.exit_status() for t in self.tables)

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
        while len(finished) < self.num_workers or any(not t.finished for t in self.tables):
            moved = False
            for t in self.tables:
                if not t.finished and t.server.serving:
                    moved |= t.server.poll()
            for t in self.tables:  # in registration order, as the workers finish them
                if t.finished:
                    continue
                if t.server.serving:
                    break
                with self.dog.blocking("job.serve: sending the final shard to worker 0 (collective over servers and"
                                       " workers)"):
                    t.server.finish(lead=self.worker_ranks[0])
                t.comm.Free()
                t.servers.Free()
                t.finished = moved = True
            message = poll_control(self.ps_comm)
            if message is not None:
                kind, who = message
                if kind == "register":
                    register(self, None)
                else:
                    finished.add(who)
                moved = True
            if moved:
                backoff.reset()
                quiet_since = MPI.Wtime()
                continue
            open_step = next((t.server for t in self.tables if not t.finished and t.server.step_open), None)
            if open_step is not None and MPI.Wtime() - quiet_since > self.config.train.stall_timeout:
                raise StallError(open_step.stall_message())
            backoff.wait()
        self.dog.close()
        self._finished = True
        return max((t.server.checkpoints.exit_status() for t in self.tables), default=0)

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
                send_control(self.comm, rank, ("loader", request))
        source, plan, total, handle = open_data(self, request)
        loader = Loader(source, plan, total, handle,
                        lambda: self.tables[0].client.position if self.tables else 0)
        self._loaders.append(loader)
        return loader

    def _serve_data(self) -> int:
        """A data server: serve each ``job.loader`` the workers open, until every worker finished."""
        finished: set[int] = set()
        backoff = Backoff.for_messages()
        while len(finished) < self.num_workers:
            message = poll_control(self.comm)
            if message is None:
                backoff.wait()
                continue
            backoff.reset()
            kind, what_ = message
            if kind == "loader":
                open_data(self, what_)
            else:
                finished.add(what_)
        self.dog.close()
        self._finished = True
        return 0

    # -- registration (collective over servers and workers) ----------------------------------
    def bad_input(self, exc: BaseException) -> int:
        """Collective bad input among servers and workers: said once; every one of them exits 2."""
        self._failed = True
        if self.layout.data_servers:  # they wait elsewhere: end the whole job
            if self.ps_comm.Get_rank() == 0:
                print(f"mpips: bad {what(exc)}: {exc}", file=sys.stderr, flush=True)
            self.ps_comm.Barrier()
            abort_job(self.comm, 2)
        self.dog.close()
        return self.reporter.bad_input(exc)

    def _at_exit(self) -> None:
        """At interpreter exit: a worker that never called ``job.finish()`` (a loop left early), or
        a server that never served, would leave the others waiting: say so and end the job."""
        if self._finished or self._failed:
            return
        needs = "job.finish()" if self.is_worker else "job.serve()"
        print(f"mpips: FATAL on rank {self.comm.Get_rank()} (host {MPI.Get_processor_name()}, {self.who['role']}):"
              f" the script ended without {needs}; the other ranks would wait for it (every worker calls"
              " job.finish() after its last step, every other rank job.serve())", file=sys.stderr, flush=True)
        abort_job(self.comm, 1)

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

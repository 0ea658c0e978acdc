"""Entry point: config -> role layout -> this rank's role -> clean exit, or abort the whole job.

    mpirun -n 4 python -m mpips.train                       # MLP on digits: 1 server, 1 data server, 2 workers
    mpirun -n 6 python -m mpips.train --servers 2 --sync ssp --staleness 2
    mpirun -n 4 python -m mpips.train --dry-run             # print the role map and shard plan
    mpirun -n 4 python -m mpips.train --metrics m.jsonl --trace t.json   # then: see mpips.report
    srun python -m mpips.train --config run.toml            # on a Slurm allocation

Bad input (configuration, launcher, dataset, model) is said once, in one line, and every rank
exits with status 2 (``mpips.errors``; the traceback only with ``--debug``). Any other exception
on any rank prints one line naming the rank, host, role and cause (the traceback goes to that
rank's stderr) and calls MPI Abort with status 1, so the job ends instead of hanging.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: signals held, and a launch MPI_Init cannot survive named (mpips.launch)
    from mpips.launch import before_mpi_init

    before_mpi_init()

import dataclasses
import logging
import sys
import types
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpips import faults, stderr_filter
from mpips.checkpoint import REQUEUE_STATUS, Checkpointing, Preemption, module_spec
from mpips.config import Config
from mpips.cuda_aware import decide
from mpips.data import DatasetError, DatasetHandle, LocalSource, open_dataset
from mpips.errors import agree
from mpips.layout import PSContext, Role, RoleComms, RoleLayout
from mpips.metrics import MetricsLog, Progress, format_table
from mpips.models import ModelError
from mpips.optim import STATE_FACTOR
from mpips.precision import Precision
from mpips.server import ParameterServer
from mpips.shard import ShardPlan
from mpips.startup import (
    checked_model,
    choose_pull,
    cuda_support,
    describe_chunks,
    describe_codecs,
    describe_pipeline,
    memory_line,
    precision_words,
    prepare_outputs,
    pull_line,
    shard_values,
    total_steps,
    worker_device,
)
from mpips.tasks import LossFn, TaskMetrics, resolve_loss
from mpips.text import plural
from mpips.trace import NULL_TRACER, Tracer
from mpips.transport import Tag, recv_chunks, send_chunks, wait_all
from mpips.watchdog import Watchdog
from mpips.worker import FlatModel, Worker, evaluate

__all__ = ["FitResult", "main", "run", "run_job"]


@dataclass
class FitResult:
    """What one rank gets back from a job (``mpips.fit``, ``run_job``).

    Attributes:
        role: this rank's role, ``"worker"``, ``"server"`` or ``"data server"``.
        index: its index within the role.
        status: the job's exit status (0; 75 or 143 after a stop on a signal, ``mpips.checkpoint``).
        model: the lead worker's model, holding the final parameters (None on every other rank).
        metrics: lead worker only: the final metrics by name: ``steps``, the held-out metrics of the
            task (``loss``, ``accuracy``; ``mse``, ``mae``, ``r2``; ``f1``; ``perplexity``; None
            without held-out samples or after a stop), ``last_train_loss``, ``samples_per_s``,
            ``gradients_applied``, ``gradients_dropped``, ``gradients_late`` (bsp's backup workers: late
            pushes dropped), ``max_staleness`` (and, unless stopped,
            ``bytes_pushed``, ``bytes_pulled``: all workers).
    """

    role: str
    index: int
    status: int = 0
    model: torch.nn.Module | None = None
    metrics: dict[str, Any] | None = None

    @property
    def lead(self) -> bool:
        """Whether this rank is the lead worker (the one with the model and the metrics)."""
        return self.model is not None


def run(
    cfg: Config, comm: MPI.Comm, who: dict[str, str] | None = None, preemption: Preemption | None = None
) -> int:
    """Run this rank's part of the job; returns the exit status (0; 75 or 143 after a stop).

    ``who`` receives this rank's role as soon as it is known, for the failure message.
    ``preemption`` holds the stop requests of signal handlers ``main`` installed
    (``Preemption.install()``); a script calling ``run`` keeps its own signal handling.
    """
    return run_job(cfg, comm, who, preemption).status


def run_job(
    cfg: Config, comm: MPI.Comm, who: dict[str, str] | None = None, preemption: Preemption | None = None, *,
    model: object = None, loss: LossFn | None = None,
) -> FitResult:
    """``run``, with a model and loss given as objects (``mpips.fit``); returns this rank's FitResult.

    Args:
        model: an ``nn.Module`` (the same on every rank: checked), or a factory called as
            ``--model package.module:factory`` is; None: ``cfg.model.model``.
        loss: ``(output, target) -> scalar tensor``; None: ``cfg.train.loss``.
    """
    given_model = model
    preemption = preemption if preemption is not None else Preemption()
    dog = Watchdog(comm, cfg.train.stall_timeout, who if who is not None else {})
    rank = comm.Get_rank()
    with dog.blocking("start-up: the host names of all ranks (allgather over the world)"):
        hosts = comm.allgather(MPI.Get_processor_name())
    layout = RoleLayout.from_counts(comm.Get_size(), cfg.roles.servers, cfg.roles.data_servers, hosts,
                                    cfg.train.backup_workers)
    role = layout.role_of(rank)
    if who is not None:
        who["role"] = f"{role.value} {layout.index_of(rank)}"
    _setup_logging(rank, role, layout)
    faults.at("start-up")
    torch.set_num_threads(cfg.train.threads)
    with dog.blocking("start-up: opening the dataset (collective over the world)"):
        data = open_dataset(
            cfg.data.dataset, cfg.data.data, context=cfg.model.gpt_context, comm=comm, data_dir=cfg.data.data_dir,
            data_servers=len(layout.data_servers), replicas=cfg.data.replicas, cache_mb=cfg.data.cache_mb,
            x_key=cfg.data.x_key, y_key=cfg.data.y_key, task=cfg.data.task, num_classes=cfg.data.num_classes,
            val_data=cfg.data.val_data,
        )
    task = data.spec.task
    if cfg.data.task not in ("auto", task):
        raise DatasetError(f"--task {cfg.data.task}, but {data.path or data.name} holds {task} samples")
    epoch_plan = data.plan(len(layout.workers), cfg.data.batch_size, cfg.train.seed)
    steps = total_steps(cfg, epoch_plan)
    pull = choose_pull(cfg.train.pull)
    loss_fn = agree(comm, lambda: resolve_loss(loss if loss is not None else cfg.train.loss, task), dog.blocking)
    agree(comm, lambda: prepare_outputs(cfg), dog.blocking)
    # only workers build the model: the servers take its shard plan and their initial values from
    # the lead worker (as from a registration, mpips.job), so they never build or import it
    model = agree(comm, lambda: checked_model(cfg, data, role == Role.WORKER, rank == layout.lead_worker, given_model,
                                              loss_fn), dog.blocking)
    if isinstance(given_model, torch.nn.Module):
        with dog.blocking("start-up: every worker's checksum of the given model (allgather over the world)"):
            _same_model_everywhere(comm, model)
    with dog.blocking("start-up: the shard plan from the lead worker (broadcast over the world)"):
        plan = comm.bcast(ShardPlan.for_module(model, cfg.roles.servers) if rank == layout.lead_worker else None,
                          root=layout.lead_worker)
    if rank == 0:
        print(layout.describe(), flush=True)
        print(plan.describe(STATE_FACTOR[cfg.server_optim().optimizer]), flush=True)
        print(memory_line(cfg, plan, len(layout.workers)), flush=True)
        print(describe_chunks(plan, cfg.train.chunk_bytes), flush=True)
        print(describe_codecs(cfg.compression, cfg.optim), flush=True)
        print(describe_pipeline(cfg.train), flush=True)
        print(
            f"data: {data.name}, {len(data.train)} training / {len(data.val_y)} held-out samples;"
            f" {plural(epoch_plan.steps_per_epoch, 'step')} per epoch of {epoch_plan.global_batch};"
            f" {plural(steps, 'step')}; sync {cfg.train.sync}", flush=True,
        )
        if layout.data_servers:
            from mpips.data.assign import DataAssignment

            sizes, d, w = data.partitions.sizes, len(layout.data_servers), len(layout.workers)
            print(DataAssignment.build(sizes, d, w, cfg.data.replicas).describe(layout.data_servers), flush=True)
    result = FitResult(role.value.replace("-", " "), layout.index_of(rank))
    if cfg.train.dry_run:
        return result

    with dog.blocking("start-up: every rank to choose the checkpoint and split the communicators"):
        counts = {"servers": len(layout.servers), "data_servers": len(layout.data_servers),
                  "workers": len(layout.workers)}
        module = module_spec(FlatModel.module_state_of(model)) if model is not None else None
        ckpt = Checkpointing.setup(cfg, comm, counts, plan, module, steps, preemption)
        if ckpt.complete:  # a finished run resumed (requeued): its final model, nothing to train
            if rank == layout.lead_worker:
                result.model = ckpt.restore_model(model)
                _save_model(cfg, types.SimpleNamespace(model=model))
            return result
        comms = RoleComms.split(comm, layout)
        ps_comm = comm.Split(0 if role != Role.DATA else 1, rank)
    with dog.blocking("start-up: measuring clock offsets for --trace (ping-pongs with rank 0)"):
        tracer = Tracer.start(comm, role.value, layout.index_of(rank), enabled=bool(cfg.train.trace))
    ckpt.tracer = tracer
    try:
        if role == Role.SERVER:
            # the lead worker's values of this server's shard become its working copy (``[...]``:
            # no reference is left here once the server owns them)
            init = [np.empty(plan.shard_numel(layout.index_of(rank)), dtype=np.float32)]
            with dog.blocking("start-up: the shard's initial values from the lead worker"):
                wait_all(recv_chunks(comm, init[0], layout.lead_worker, Tag.INIT, cfg.train.chunk_bytes),
                         "the lead worker's initial values", cfg.train.stall_timeout)
            _run_server(cfg, layout, comms, ps_comm, plan, init, steps, pull, ckpt, dog, tracer)
        elif role == Role.WORKER:
            if rank == layout.lead_worker:
                sends = [r for s, server in enumerate(layout.servers) for r in
                         send_chunks(comm, shard_values(model, plan, s), server, Tag.INIT, cfg.train.chunk_bytes)]
                wait_all(sends, "the servers to take the initial values", cfg.train.stall_timeout)
            job = _WorkerJob(task, loss_fn, result)
            _run_worker(cfg, layout, comms, ps_comm, plan, model, data, epoch_plan, steps, pull, ckpt, dog, job,
                        tracer)
        else:
            from mpips.dataserver import run_data_server

            run_data_server(cfg, layout, comms, data, epoch_plan, steps, tracer)
        if cfg.train.trace:
            with dog.blocking("shutdown: gathering every rank's trace spans to rank 0 (--trace)"):
                tracer.write(comm, cfg.train.trace)
            if rank == 0:
                print(f"trace of {comm.Get_size()} ranks written to {cfg.train.trace}"
                      " (open it in https://ui.perfetto.dev, or run python -m mpips.report)", flush=True)
    finally:
        comms.free()
        ps_comm.Free()
        dog.close()
    result.status = ckpt.exit_status()
    return result


@dataclass
class _WorkerJob:
    """What a worker needs beyond the configuration: the task, the loss, where results go."""

    task: str
    loss: LossFn
    result: FitResult


def _same_model_everywhere(comm: MPI.Comm, model: torch.nn.Module | None) -> None:
    """ModelError on every rank when the model object given to ``fit`` differs between ranks
    (each server takes its shard from its own rank's copy)."""
    crc = None
    if model is not None:
        crc = 0
        for p in model.parameters():
            crc = zlib.crc32(p.detach().cpu().contiguous().numpy().tobytes(), crc)
    sums = {c for c in comm.allgather(crc) if c is not None}
    if len(sums) > 1:
        raise ModelError("the model given to mpips.fit has different parameters on different ranks: seed torch"
                         " before building it (torch.manual_seed) or pass a factory, which mpips calls after"
                         " seeding with --seed")


def _ps_rank(layout: RoleLayout, world_rank: int) -> int:
    """Rank in the parameter-server communicator (servers + workers, world order)."""
    members = sorted(layout.servers + layout.workers)
    return members.index(world_rank)


def _ps_context(cfg: Config, layout: RoleLayout, ps_comm: MPI.Comm, plan: ShardPlan, steps: int, pull: str,
                ckpt: Checkpointing) -> PSContext:
    return PSContext(comm=ps_comm, servers=[_ps_rank(layout, r) for r in layout.servers],
                     workers=[_ps_rank(layout, r) for r in layout.workers], plan=plan, train=cfg.train,
                     optim=cfg.optim, pull=pull, total_steps=steps, checkpoints=ckpt, compression=cfg.compression)


def _run_server(
    cfg, layout, comms, ps_comm, plan, init: list[np.ndarray], steps, pull, ckpt, dog, tracer=NULL_TRACER
) -> None:
    index = layout.index_of(comms.world.Get_rank())
    ckpt.bind(ps_comm, "server", index)
    # --momentum-correction: the workers hold the momentum, the servers run plain SGD (Config.server_optim)
    ctx = dataclasses.replace(_ps_context(cfg, layout, ps_comm, plan, steps, pull, ckpt), optim=cfg.server_optim())
    server = ParameterServer(ctx, index, init.pop(),
                             comms.role, cfg.data.batch_size)
    server.tracer = tracer
    with dog.blocking("start-up: the parameter windows (collective over servers and workers)"), tracer.span("start-up"):
        server.start()
    resumed = ckpt.server_state(server.state_dict())  # any --servers: the flat vector is re-cut here
    if resumed is not None:
        server.load_state_dict(resumed)
    server.serve()
    with dog.blocking("shutdown: the final shard gather to the lead worker and the window free"
                      " (collective over servers and workers)"):
        server.finish(lead=_ps_rank(layout, layout.lead_worker))


def _run_worker(
    cfg, layout, comms, ps_comm, plan, model, data: DatasetHandle, epoch_plan, steps, pull, ckpt, dog,
    job: _WorkerJob,
    tracer=NULL_TRACER,
) -> None:
    world = comms.world
    rank = world.Get_rank()
    index, lead = layout.index_of(rank), rank == layout.lead_worker
    device = worker_device(cfg.train.device, layout.local_rank(rank))
    comp = cfg.compression
    needs_host = " and ".join(f for f in (f"--compress {comp.compress}" if comp.compress != "none" else "",
                                          f"--pull-codec {comp.pull_codec}" if comp.pull_codec != "fp32" else "") if f)
    decision = decide(cfg.train.cuda_aware, cuda_support(), device.type, needs_host)
    flat = FlatModel(model, plan, device, path=decision.path, overlap_backward=cfg.train.precision != "fp16")
    trainable = [p for p in flat.model.parameters() if p.requires_grad]
    precision = Precision(cfg.train.precision, device, flat.dtype, trainable)
    if lead:
        print(decision.line, flush=True)
        print(f"precision: {cfg.train.precision} on {device.type} workers"
              f" ({precision_words(cfg.train.precision)}); parameters {str(flat.dtype).removeprefix('torch.')} on"
              " workers, float32 master and optimizer state on the servers", flush=True)
    ckpt.bind(ps_comm, "worker", index, epoch_plan)
    if layout.data_servers:
        from mpips.dataserver import RemoteSource

        source = RemoteSource.for_job(world, cfg, layout, index, epoch_plan, data, steps)
    else:
        source = LocalSource(data.train, epoch_plan, index)
    metrics = MetricsLog(cfg.train.metrics, rank=rank)
    progress = Progress(steps, cfg.train.log_every, enabled=lead)
    said_no_eval = [False]

    def on_eval(step: int) -> None:
        faults.at("evaluation", step)
        result = evaluate(flat.model, data.val_x, data.val_y, device, task=job.task, loss=job.loss,
                          precision=precision)
        if result is None:
            if not said_no_eval[0]:
                print("no held-out samples: evaluation skipped (--eval-every)", flush=True)
                said_no_eval[0] = True
            return
        metrics.event("eval", step, **result)
        progress.write(f"eval step {step}: held-out " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))

    worker = Worker(_ps_context(cfg, layout, ps_comm, plan, steps, pull, ckpt), index, flat, source, epoch_plan,
                    metrics, progress, on_eval if lead else None, loss=job.loss, precision=precision)
    worker.tracer = tracer
    with dog.blocking("start-up: the parameter windows (collective over servers and workers)"), tracer.span("start-up"):
        worker.start()
    if lead:  # only now: the windows may have fallen back to message pulls
        print(pull_line(cfg.train.pull, pull, worker.pull_mode), flush=True)
    resumed = ckpt.worker_state(worker.state_dict())
    if resumed is not None:
        worker.load_state_dict(resumed)
    stats = worker.run()
    progress.close()
    with dog.blocking("shutdown: the final parameters from every server and the window free"
                      " (collective over servers and workers)"):
        final = worker.finish(lead=_ps_rank(layout, layout.lead_worker))
    if lead:
        with tracer.span("final evaluation and report"):
            job.result.metrics = _report(cfg, flat, final, worker, data, device, stats, metrics, steps, ckpt, job)
        job.result.model = flat.model
    metrics.close()


def _report(cfg, flat, final, worker, data, device, stats, metrics, steps, ckpt, job: _WorkerJob
            ) -> dict[str, Any]:
    """Lead worker: evaluate the final parameters, print the table, save the model; returns the
    metrics by name (``FitResult.metrics``).

    After a stop on a signal the model is saved (where ``--save`` asks) but not evaluated.
    """
    flat.load_wire(final)
    names = TaskMetrics.names(job.task)
    servers = worker.server_stats
    out: dict[str, Any] = {
        "steps": steps, **dict.fromkeys(names),
        "last_train_loss": stats.last_loss,
        "samples_per_s": stats.samples * worker.epoch_plan.workers
        / max(1e-9, stats.pull_seconds + stats.compute_seconds + stats.push_seconds),
        "gradients_applied": sum(s.applied for s in servers),
        "gradients_dropped": sum(s.dropped for s in servers),
        "gradients_late": sum(s.late for s in servers),
        "max_staleness": max(s.max_staleness for s in servers),
    }
    if stats.preempted:
        print(f"stopped on {ckpt.preemption.signal_name or 'a signal'} at step {worker.position} of {steps}: "
              + (f"checkpoint {ckpt.last_path} written; exiting with status {REQUEUE_STATUS}"
                 " (requeue and run again with --resume)" if ckpt.preempted else
                 f"no --checkpoint-dir, so nothing to resume from; exiting with status {ckpt.exit_status()}"),
              flush=True)
        _save_model(cfg, flat)
        out["steps"] = worker.position
        return out
    result = evaluate(flat.model, data.val_x, data.val_y, device, task=job.task, loss=job.loss,
                      precision=worker.precision) if cfg.train.final_eval else None
    out.update(result or {})
    none = "none (no held-out samples)" if cfg.train.final_eval else "not evaluated (--no-final-eval)"
    pushed, pulled = (sum(getattr(w, key) for w in worker.worker_stats) for key in ("bytes_pushed", "bytes_pulled"))
    streamed, early = (sum(getattr(w, key) for w in worker.worker_stats)
                       for key in ("chunks_streamed", "chunks_in_backward"))
    out.update(bytes_pushed=pushed, bytes_pulled=pulled, chunks_streamed=streamed, chunks_in_backward=early)
    rows = {
        "steps": steps,
        **{f"held-out {name}": none if result is None else result[name] for name in names},
        "last train loss (worker 0)": stats.last_loss,
        "samples/s (all workers)": out["samples_per_s"],
        "gradients applied": out["gradients_applied"],
        "gradients dropped (NaN/Inf)": out["gradients_dropped"],
        **({"gradients late, dropped (backup workers)": out["gradients_late"]} if cfg.train.backup_workers else {}),
        "max staleness applied": out["max_staleness"],
        "time pulling / computing / pushing (s)":
            f"{stats.pull_seconds:.2f} / {stats.compute_seconds:.2f} / {stats.push_seconds:.2f}",
        "bytes pushed / pulled (all workers)": f"{pushed:,} / {pulled:,}",
    }
    if streamed:
        rows["chunks pushed during backward (all workers)"] = f"{early:,} of {streamed:,}"
    if cfg.train.precision == "fp16":
        rows["steps skipped, fp16 overflow (worker 0)"] = stats.skipped
    print(format_table(rows, "final metrics"), flush=True)
    held_out = {name: out[name] for name in names}
    if result is not None:
        metrics.event("eval", steps, **held_out)
    metrics.event(
        "end", steps, **held_out, applied=out["gradients_applied"], dropped=out["gradients_dropped"],
        late=out["gradients_late"], max_staleness=out["max_staleness"],
        staleness=[x for s in servers for x in s.staleness],
        bytes_pushed=pushed, bytes_pulled=pulled, chunks_streamed=streamed, chunks_in_backward=early,
    )
    _save_model(cfg, flat)
    return out


def _save_model(cfg, flat) -> None:
    if cfg.train.save:
        state = {k: v.detach().cpu().clone() for k, v in flat.model.state_dict().items()}
        torch.save(state, cfg.train.save)
        print(f"saved model state_dict to {cfg.train.save}", flush=True)


def _setup_logging(rank: int, role: Role, layout: RoleLayout) -> None:
    level = logging.INFO if rank == 0 or role == Role.SERVER else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"[mpips rank {rank} {role.value} {layout.index_of(rank)}] %(levelname)s %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, check the launch, run this rank's role; bad input exits 2 (said once), a crash aborts.

    The command line is a user of ``mpips.fit``: the same call, with the flags as its config and
    the stop signals handled (SIGTERM, SIGUSR1, SIGINT: checkpoint and stop at a step boundary).
    """
    from mpips.api import _fit

    argv = sys.argv[1:] if argv is None else list(argv)
    comm = MPI.COMM_WORLD
    if MPI.get_vendor()[0] == "Open MPI" and comm.Get_size() > 1:
        stderr_filter.install()  # a dead peer must not flood the terminal
    return _fit(None, None, None, None, argv, comm, handle_signals=True).status


if __name__ == "__main__":
    sys.exit(main())

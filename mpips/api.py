"""The Python API: train your model, loss and data from a script run under mpirun.

    # train_mine.py, run as: mpirun -n 4 python train_mine.py
    import math

    import torch
    from torch import nn
    import mpips

    def make_net(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

    result = mpips.fit(make_net, loss=nn.functional.mse_loss, data="shards/*.h5",
                       val_data="val.h5", config={"x_key": "features", "y_key": "target", "steps": 500})
    if result.lead:                           # the lead worker: the trained model and the metrics
        print(result.metrics["mse"])
        torch.save(result.model.state_dict(), "model.pt")

Every rank calls ``fit`` with the same arguments. Inside it each rank takes its role (parameter
server, data server or worker, ``mpips.layout``); servers and data servers serve until training
ends and return a ``FitResult`` saying their role, workers train, and the lead worker's result
holds the trained model and the final metrics. ``python -m mpips.train`` is this same call:
``main(argv)`` is ``fit(config=argv)``.

Failures are those of the command line: bad input (configuration, launch, dataset, model, loss)
is said once in one line (``mpips: bad <what>: ...``) and every rank raises ``SystemExit(2)``;
anything else raised on any rank (a crash, or an exception from the user's model or loss) prints
``mpips: FATAL on rank R (host H, role)`` and aborts the whole job with status 1 (MPI Abort), so
no rank is left waiting.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from mpips.checkpoint import Preemption
from mpips.config import Config, ConfigError, from_flat, parse_args
from mpips.errors import INPUT_ERRORS, Reporter, check_launch, speaks
from mpips.train import FitResult, run_job
from mpips.watchdog import abort_job

__all__ = ["FitResult", "fit"]

ModelLike = nn.Module | Callable[..., nn.Module] | str | None
LossLike = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None


def fit(
    model: ModelLike = None,
    *,
    loss: LossLike = None,
    data: str | Sequence[str] | None = None,
    val_data: str | Sequence[str] | None = None,
    config: Config | dict[str, Any] | Sequence[str] | None = None,
    comm: MPI.Comm | None = None,
    handle_signals: bool = False,
) -> FitResult:
    """Train ``model`` on ``data`` with ``loss`` using parameter servers; collective over ``comm``.

    Args:
        model: an ``nn.Module`` with float32 parameters, built the same way on every rank (seed
            torch first; checked: each server takes its shard from its own rank's copy); or a
            factory, called on every rank after ``torch.manual_seed(seed)`` with the keywords of the
            factory contract (``input_shape``, ``num_classes``, ``task``, ``target_shape``; see
            ``mpips.models``); or a ``--model`` name (``mlp``, ``cnn``, ``gpt``,
            ``package.module:factory``); None: the config's model (default ``mlp``). For a batch of
            B samples its output is ``(B, num_classes)`` (tokens: ``(B, T, num_classes)``).
        loss: ``(output, target) -> scalar tensor``, the batch mean (e.g. ``nn.MSELoss()``, or
            ``torch.nn.functional.huber_loss``); or a ``--loss`` name (``cross_entropy``, ``mse``,
            ``huber``, ``bce``, ``next_token``, ``package.module:function``); None: the config's
            (default ``auto``: the task's).
        data: HDF5 training data, as ``--data``: a file written by ``python -m mpips.data
            prepare``, or HDF5 files read in place (a path, a glob, or a list of paths) whose
            datasets the config's ``x_key``/``y_key`` name; None: the config's (default: the
            built-in digits).
        val_data: held-out HDF5 file(s) for data read in place, as ``--val-data``.
        config: a ``mpips.config.Config``; or a dict of its keys, flat as the flags are named
            (``{"steps": 500, "lr": 1e-3, "servers": 2}``) or by concern (``{"optim": {"lr": 1e-3}}``);
            or a list of command-line flags (``["--steps", "500"]``). Default: the defaults of
            ``python -m mpips.train``.
        comm: the world of this job (default ``MPI.COMM_WORLD``); every rank of it calls ``fit``.
        handle_signals: SIGTERM, SIGUSR1 and SIGINT stop the job at the next step boundary with a
            checkpoint where one is configured, as on the command line (the handlers stay
            installed after the call); default: the script keeps its own signal handling.

    Returns:
        This rank's ``FitResult``: ``role`` and ``index``; ``status`` (0, or 75 / 143 after a stop
        on a signal); on the lead worker (``result.lead``) ``model``, the trained module (on
        the workers' device), and ``metrics``, a dict: ``steps``, the held-out metrics of the task
        by name (``loss``; ``accuracy``; ``mse``, ``mae``, ``r2``; ``f1``; ``perplexity``),
        ``last_train_loss``, ``samples_per_s``, ``gradients_applied``, ``gradients_dropped``,
        ``max_staleness``.

    Raises:
        SystemExit: status 2 on every rank after bad input (said once, in one line); status 0
            after ``--help`` in ``config``. A crash on any rank does not return: it aborts the job.
    """
    result = _fit(model, loss, data, val_data, config, comm if comm is not None else MPI.COMM_WORLD,
                  handle_signals)
    if result.role == "none":
        raise SystemExit(result.status)
    return result


def _fit(model: ModelLike, loss: LossLike, data: Any, val_data: Any, config: Any, comm: MPI.Comm,
         handle_signals: bool) -> FitResult:
    """``fit`` without the SystemExit: bad input and ``--help`` give a FitResult of role ``none``."""
    argv = list(config) if isinstance(config, list | tuple) else []
    report = Reporter(comm, speaks(comm.Get_rank(), comm.Get_size(), os.environ), MPI.Get_processor_name(),
                      debug="--debug" in argv or isinstance(config, Config) and config.train.debug)
    who = {"role": "role not yet assigned"}
    try:
        try:
            with report.quiet_unless_speaker():
                cfg = _config(config, model, loss, data, val_data)
        except SystemExit as exc:  # --help, printed by one rank
            return FitResult("none", 0, exc.code if isinstance(exc.code, int) else 0)
        report.debug = report.debug or cfg.train.debug
        check_launch(MPI.COMM_WORLD.Get_size(), os.environ, MPI.get_vendor())  # the launch, not comm
        preemption = Preemption.install() if handle_signals else None
        given = model if model is not None and not isinstance(model, str) else None
        result = run_job(cfg, comm, who, preemption, model=given, loss=loss if callable(loss) else None)
        if handle_signals:
            # The run is over, and a stop request has nothing left to stop: a late SIGUSR1 (Slurm's
            # --signal=USR1@T comes up to ~30 s late) must not kill this rank in its shutdown, where
            # Python restores the default action, terminate, of the handlers it installed.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return result
    except INPUT_ERRORS as exc:  # the same on every rank: said once, status 2
        return FitResult("none", 0, report.bad_input(exc))
    except BaseException as exc:  # noqa: BLE001 - any failure must end the whole job
        abort(comm, exc, who["role"])
        return FitResult("none", 0, 1)


def _config(config: Any, model: ModelLike, loss: LossLike, data: Any, val_data: Any) -> Config:
    """The validated Config of a ``fit`` call: ``config`` with the arguments' overrides."""
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = dataclasses.replace(config, **{f.name: dataclasses.replace(getattr(config, f.name))
                                             for f in dataclasses.fields(config)})
    elif isinstance(config, dict):
        flat: dict[str, Any] = {}
        concerns = {f.name for f in dataclasses.fields(Config)}
        for key, value in config.items():
            if key in concerns and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        cfg = from_flat(flat)
    elif isinstance(config, list | tuple):
        cfg = parse_args([str(a) for a in config])
    else:
        raise ConfigError(f"config must be a Config, a dict or a list of flags, got {type(config).__name__}")
    if isinstance(model, str):
        cfg.model.model = model
    if isinstance(loss, str):
        cfg.train.loss = loss
    if data is not None:
        cfg.data.data = data if isinstance(data, str) else ",".join(str(p) for p in data)
    if val_data is not None:
        cfg.data.val_data = val_data if isinstance(val_data, str) else ",".join(str(p) for p in val_data)
    return cfg.validate()


def abort(comm: MPI.Comm, exc: BaseException, role: str) -> None:
    """Report the failure once, with rank, host and role, then take the whole job down."""
    rank = comm.Get_rank()
    traceback.print_exc(file=sys.stderr)
    print(
        f"mpips: FATAL on rank {rank} (host {MPI.Get_processor_name()}, {role}):"
        f" {type(exc).__name__}: {exc}",
        file=sys.stderr, flush=True,
    )
    abort_job(comm)

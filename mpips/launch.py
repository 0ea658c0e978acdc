"""What must happen before MPI_Init, in the first instant of ``python -m mpips.train``.

Two things cannot wait for MPI and the heavy imports (torch, h5py) to load:

- **Stop signals.** Slurm's ``--signal=USR1@T`` or a ``scancel --signal=USR1`` may come while a
  rank is still starting; Python's default action for SIGUSR1 and SIGTERM ends the process, and
  the job with it. ``hold_stop_signals`` records them from the start; ``take_held_signal`` hands
  the first to ``mpips.checkpoint.Preemption``, and the job stops at its first step boundary.
- **A launch MPI_Init cannot survive.** Open MPI under ``srun`` without a PMI plugin
  (``srun --mpi=none`` where the site's ``MpiDefault`` is none) aborts inside MPI_Init, on every
  task, with its own multi-line text, before mpips could say anything. ``check_srun_pmi`` sees it
  from the environment (srun started N > 1 tasks and set no PMIx/PMI variable), loads the MPI
  library without initialising it to learn which it is, and says so in one line with the fix,
  from Slurm's task 0 only, exit status 2. Other MPIs start such tasks as N worlds of one, which
  ``mpips.errors.check_launch`` names after MPI_Init.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["BAD_LAUNCH", "before_mpi_init", "check_srun_pmi", "hold_stop_signals", "srun_without_pmi",
           "take_held_signal"]

BAD_LAUNCH = 2  # the exit status of bad input (mpips.errors.BAD_INPUT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# variables a PMI or PMIx server (srun --mpi=pmix/pmi2, mpirun, mpiexec) gives each process
PMI_VARIABLES = ("PMIX_RANK", "PMIX_NAMESPACE", "PMI_RANK", "PMI_FD", "PMI_SIZE", "OMPI_COMM_WORLD_RANK")

_held: list[int] = []  # stop signals received before Preemption took over, in order


def _hold(signum: int, frame: Any) -> None:
    _held.append(signum)


def hold_stop_signals() -> None:
    """Record SIGTERM, SIGUSR1 and SIGINT instead of dying of them (until Preemption installs)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _hold)


def take_held_signal() -> str:
    """The name of the first stop signal held since start-up ("" if none); forgets them."""
    name = signal.Signals(_held[0]).name if _held else ""
    _held.clear()
    return name


def srun_without_pmi(environ: Mapping[str, str]) -> int:
    """The task count of an srun step of several tasks that got no PMI/PMIx variables, else 0."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    if not tasks.isdigit() or int(tasks) < 2 or any(v in environ for v in PMI_VARIABLES):
        return 0
    return int(tasks)


def check_srun_pmi(environ: Mapping[str, str]) -> None:
    """Exit 2 with one line (Slurm task 0) where Open MPI would abort in MPI_Init under srun.

    Loads mpi4py's MPI without initialising it only in that case (then initialises it here, as
    mpi4py would have, for the other MPI libraries). Does nothing once MPI is loaded.
    """
    tasks = srun_without_pmi(environ)
    if not tasks or "mpi4py.MPI" in sys.modules:
        return
    import mpi4py

    mpi4py.rc.initialize, mpi4py.rc.finalize = False, True
    from mpi4py import MPI

    name, version = MPI.get_vendor()
    if name != "Open MPI":
        levels = {"multiple": MPI.THREAD_MULTIPLE, "serialized": MPI.THREAD_SERIALIZED,
                  "funneled": MPI.THREAD_FUNNELED, "single": MPI.THREAD_SINGLE}
        MPI.Init_thread(levels[mpi4py.rc.thread_level] if mpi4py.rc.threads else MPI.THREAD_SINGLE)
        return
    if environ.get("SLURM_PROCID", "0") == "0":
        print(f"mpips: bad launch: srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}) without a PMI"
              f" plugin (no PMIX_RANK or PMI_RANK in the environment), and {name}"
              f" {'.'.join(map(str, version))} cannot start its ranks without one. Run `srun --mpi=pmix`"
              " (`srun --mpi=list` lists this Slurm's plugins; the jobs/slurm scripts choose it), or"
              " Open MPI's own mpirun inside the allocation", file=sys.stderr, flush=True)
    sys.exit(BAD_LAUNCH)


def before_mpi_init(environ: Mapping[str, str] | None = None) -> None:
    """Hold stop signals, then check the launch; call before anything imports ``mpi4py.MPI``."""
    hold_stop_signals()
    check_srun_pmi(os.environ if environ is None else environ)

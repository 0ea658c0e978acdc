"""Environment self-test: can this machine (or allocation) run an mpips job?

    python -m mpips.doctor                  # one process; probes RMA with its own `mpirun -n 2`
    mpirun -n 4 python -m mpips.doctor      # the job's own launch line: probes these ranks
    srun -n 8 python -m mpips.doctor        # same, on a Slurm allocation

Rank 0 prints one line per check: the MPI library and standard, the thread level, the ranks
and hosts, whether a passive-target ``MPI_Get`` completes while its target computes without
calling MPI (what parameter pulls rely on), whether MPI is CUDA-aware, h5py's MPI-IO, torch,
numpy and thread settings, then advice for anything that will be slow or will not work.
The exit status is 1 when something every job needs is missing (mpi4py, h5py, torch), 0
otherwise, and the same on every rank.

Modules: ``checks`` (one ``Finding`` per check, the report), ``probes`` (libmpi, CUDA-awareness,
passive-target progress), ``launcher`` (launchers, bounded subprocesses), ``cli`` (``main``).
"""

from mpips.doctor.checks import FAIL, OK, SETUP_ADVICE, WARN, Finding
from mpips.doctor.cli import main
from mpips.doctor.launcher import (
    LauncherClaim,
    end_session,
    launcher_claim,
    launcher_world_size,
    matching_launcher,
    run_bounded,
)
from mpips.doctor.probes import ProbeResult, cuda_aware, cuda_probe, find_loaded_libmpi, rma_passive_progress

__all__ = [
    "FAIL",
    "OK",
    "SETUP_ADVICE",
    "WARN",
    "Finding",
    "cuda_probe",
    "ProbeResult",
    "cuda_aware",
    "end_session",
    "find_loaded_libmpi",
    "LauncherClaim",
    "launcher_claim",
    "launcher_world_size",
    "matching_launcher",
    "main",
    "rma_passive_progress",
    "run_bounded",
]

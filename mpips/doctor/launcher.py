"""Launchers and bounded subprocesses: which launcher started this process and how many ranks it
claims, which ``mpirun`` belongs to mpi4py's MPI, and running a command with a time limit that
ends its whole session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "end_session",
    "LauncherClaim",
    "launcher_claim",
    "launcher_world_size",
    "matching_launcher",
    "run_bounded",
]


# Debian and Ubuntu install each MPI's launcher under its own name as well; `mpirun` is whichever
# update-alternatives picked, not necessarily the MPI that mpi4py was built for.
_OWN_MPIRUN = {"MPICH": "mpirun.mpich", "Open MPI": "mpirun.openmpi"}


@dataclass(frozen=True)
class LauncherClaim:
    """What a launcher's environment variables say about this process.

    Attributes:
        launcher: who set them, in words ("Open MPI's mpirun", "srun", ...).
        size_var: the variable that gave the size, e.g. ``OMPI_COMM_WORLD_SIZE``.
        size: how many processes the launcher started.
        rank: this process's number among them, or None where the launcher set none.
    """

    launcher: str
    size_var: str
    size: int
    rank: int | None


# (size variable, rank variable, launcher), most specific first: mpirun under Slurm starts its
# daemons with srun, so its ranks carry srun's variables too, with srun's (smaller) counts.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI's mpirun"),
    ("PMI_SIZE", "PMI_RANK", "a PMI launcher (MPICH's or Intel MPI's mpiexec, srun --mpi=pmi2)"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"),
)


def launcher_claim(environ: Mapping[str, str]) -> LauncherClaim | None:
    """How many processes the launcher says it started, and which one this is.

    Args:
        environ: the process environment.

    Returns:
        From ``OMPI_COMM_WORLD_SIZE``/``_RANK`` (Open MPI), ``PMI_SIZE``/``PMI_RANK`` (MPICH, Intel
        MPI, srun with PMI2) or ``SLURM_STEP_NUM_TASKS``/``SLURM_PROCID`` (srun), the first set;
        None when no launcher set any.
    """
    for size_var, rank_var, launcher in _LAUNCHER_VARS:
        size = environ.get(size_var, "")
        if size.isdigit():
            rank = environ.get(rank_var, environ.get("PMIX_RANK", ""))
            return LauncherClaim(launcher, size_var, int(size), int(rank) if rank.isdigit() else None)
    return None


def launcher_world_size(environ: Mapping[str, str]) -> int | None:
    """How many processes the launcher says it started (``launcher_claim``), or None.

    A world size that differs from this means the launcher and mpi4py belong to different MPI
    libraries (or srun lacks the PMI plugin the MPI needs): every process then initialises
    alone, as rank 0 of a world of one.
    """
    claim = launcher_claim(environ)
    return claim.size if claim is not None else None


def matching_launcher(vendor: str) -> str | None:
    """The launcher of the MPI that mpi4py uses: ``mpirun`` on PATH if it is of that MPI, else the
    MPI's own (``mpirun.mpich``, ``mpirun.openmpi`` on Debian and Ubuntu), else None.

    Args:
        vendor: ``mpi4py.MPI.get_vendor()[0]``, e.g. "Open MPI" or "MPICH".
    """
    for name in dict.fromkeys(("mpirun", _OWN_MPIRUN.get(vendor, "mpirun"))):
        path = shutil.which(name)
        version = _mpirun_version(path) if path is not None else ""
        if version and _same_mpi(version, vendor):
            return path
    return None


def _same_mpi(version: str, vendor: str) -> bool:
    """Is an mpirun whose ``--version`` says ``version`` of the MPI ``vendor``?"""
    return ("Open MPI" in version) == (vendor == "Open MPI")


def _mpirun_version(mpirun: str | None) -> str:
    """The first line of ``mpirun --version``; empty without mpirun or an answer."""
    if mpirun is None:
        return ""
    try:
        return _first_line(run_bounded([mpirun, "--version"], dict(os.environ), 30).stdout)
    except subprocess.TimeoutExpired:
        return ""


def run_bounded(cmd: list[str], env: Mapping[str, str], timeout: float,
                cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (typically an mpirun) with text output captured, never past ``timeout``.

    Args:
        cmd: the command line.
        env: its whole environment. Pass one explicitly: after a singleton ``MPI_Init`` in this
            process, Open MPI has added variables to the C environment that a child inherits
            by default and that make a child mpirun fail silently.
        timeout: seconds; then the command and everything it started are ended.
        cwd: working directory, default this process's.

    Returns:
        The finished process.

    Raises:
        subprocess.TimeoutExpired: on timeout, with the output so far in ``output``/``stderr``.
    """
    with subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_session(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def end_session(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a process started with ``start_new_session=True`` and everything it started.

    SIGTERM first: mpirun forwards it to its ranks and reaps them. Open MPI puts each rank in
    its own process group, so a group kill would miss them, but they stay in the session
    mpirun leads; whatever is left of that session after ``grace_s`` gets SIGKILL (Linux).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in _session_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid``, from /proc (empty where there is none)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesised command name: state ppid pgrp session ...
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            members.append(int(entry.name))
    return members


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")

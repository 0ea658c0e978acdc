"""Run mpirun from a test without ever hanging the suite.

Use these from plain (not ``mpi``-marked) tests; pytest puts ``tests/`` on ``sys.path``::

    from helpers import run_mpi, run_train

    def test_default_job_trains(tmp_path):
        result = run_train(4, "--steps", "20", timeout=120, cwd=tmp_path, check=True)
        assert "loss" in result.stdout

The environment is this process's with ``jobs/env.sh`` applied (root, oversubscription and
yield-when-idle for Open MPI; ``OMP_NUM_THREADS=1``), so tests launch what ``jobs/run.sh``
launches. On timeout the whole job is killed, ranks included, and :class:`MpiRunTimeout`
reports the command with the tail of its output.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

__all__ = ["REPO", "MpiRunTimeout", "mpi_env", "run_mpi", "run_train"]

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 40


class MpiRunTimeout(AssertionError):
    """An mpirun outlived its timeout; it and every process it started have been killed."""


def mpi_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``jobs/env.sh`` applied, then ``overrides``.

    An explicit copy of ``os.environ`` is needed even without overrides: after a singleton
    ``MPI_Init`` in this process, Open MPI has added variables to the C-level environment that
    make a child mpirun fail silently.

    Args:
        overrides: variables to set; a value of None removes the variable.
    """
    script = 'source "$1" >/dev/null && env -0'
    done = subprocess.run(["bash", "-c", script, "bash", str(REPO / "jobs" / "env.sh")],
                          env=dict(os.environ), capture_output=True, check=True, timeout=60)
    env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_mpi(nprocs: int, args: list[str], timeout: float = 120,
            env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``mpirun -n nprocs <this python> *args`` and capture its output as text.

    Args:
        nprocs: number of ranks.
        args: arguments after the interpreter, e.g. ``["-m", "mpips.doctor"]``.
        timeout: seconds before the whole job is killed and :class:`MpiRunTimeout` raised.
        env: variables to set (None removes one) on top of :func:`mpi_env`.
        cwd: working directory of the job; default: this process's.
        check: raise AssertionError, with the output's tail, on a non-zero exit status.

    Returns:
        The finished process, with ``stdout`` and ``stderr``.
    """
    if any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        pytest.skip("starts its own mpirun; run it with plain pytest, not under mpirun")
    cmd = ["mpirun", "-n", str(nprocs), sys.executable, *args]
    with subprocess.Popen(_with_parent_death_signal(cmd), env=mpi_env(env), cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_session(proc)
            stdout, stderr = proc.communicate()
            raise MpiRunTimeout(_describe(f"timed out after {timeout:g} s and was killed",
                                          cmd, stdout, stderr)) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(_describe(f"exited with status {result.returncode}",
                                       cmd, stdout, stderr))
    return result


def run_train(nprocs: int, *flags: str, timeout: float = 300,
              env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None,
              check: bool = False) -> subprocess.CompletedProcess[str]:
    """``run_mpi(nprocs, ["-m", "mpips.train", *flags], ...)``: one training job."""
    return run_mpi(nprocs, ["-m", "mpips.train", *flags], timeout=timeout, env=env, cwd=cwd,
                   check=check)


@functools.cache
def _setpriv_has_pdeathsig() -> bool:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return False
    usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True).stdout
    return "--pdeathsig" in usage


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
    """Have mpirun terminated (and so end its ranks) if this test process dies first, e.g. at
    pytest-timeout's or faulthandler's exit, which skip every cleanup here."""
    return ["setpriv", "--pdeathsig", "TERM", *cmd] if _setpriv_has_pdeathsig() else cmd


def _end_session(proc: subprocess.Popen) -> None:
    """Stop mpirun and everything it started.

    SIGTERM first: mpirun forwards it and reaps its ranks. Open MPI puts each rank in its own
    process group, so a group kill would miss them; they do stay in the session mpirun leads
    (``start_new_session``), and whatever remains of it after 5 s gets SIGKILL.
    """
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in _session_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            members.append(int(entry.name))
    return members


def _describe(what: str, cmd: list[str], stdout: str, stderr: str) -> str:
    def tail(text: str) -> str:
        return "\n".join(text.splitlines()[-TAIL_LINES:]) or "(empty)"

    return (f"`{' '.join(cmd)}` {what}\n--- stdout (last {TAIL_LINES} lines) ---\n"
            f"{tail(stdout)}\n--- stderr (last {TAIL_LINES} lines) ---\n{tail(stderr)}")

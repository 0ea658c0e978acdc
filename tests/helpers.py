"""Run mpirun from a test without ever hanging the suite.

Use these from plain (not ``mpi``-marked) tests; pytest puts ``tests/`` on ``sys.path``::

    from helpers import mpi_job, run_mpi, run_train

    def test_default_job_trains(tmp_path):
        result = run_train(4, "--steps", "20", timeout=120, cwd=tmp_path, check=True)
        assert "held-out accuracy" in result.stdout

    def test_sigusr1_checkpoints(tmp_path):            # to read output while it runs
        with mpi_job(3, ["-m", "mpips.train", ...]) as proc:
            for line in proc.stdout: ...
            proc.send_signal(signal.SIGUSR1)

The environment is this process's with ``jobs/env.sh`` applied (root, oversubscription and
yield-when-idle for Open MPI; ``OMP_NUM_THREADS=1``), so tests launch what ``jobs/run.sh``
launches. A job that outlives its timeout, or its ``with`` block, is ended with every rank it
started (they are not in mpirun's process group, so ``os.killpg`` alone would miss them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from mpips.doctor import end_session, run_bounded

__all__ = ["REPO", "MpiRunTimeout", "mpi_env", "mpi_job", "run_mpi", "run_train", "signal_at_line"]

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 40


class MpiRunTimeout(AssertionError):
    """An mpirun outlived its timeout; it and every process it started have been killed."""


def mpi_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``jobs/env.sh`` applied, then ``overrides``.

    Args:
        overrides: variables to set; a value of None removes the variable.
    """
    script = 'source "$1" >/dev/null && env -0'
    done = subprocess.run(["bash", "-c", script, "bash", str(REPO / "jobs" / "env.sh")],
                          env=dict(os.environ), capture_output=True, check=True, timeout=60)
    env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    # the jobs can load the test models (``--model toymodels:NAME``), as pytest's own process can
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def mpi_command(nprocs: int, args: list[str]) -> list[str]:
    """``mpirun -n nprocs <this python> *args``, terminated if this test process dies first.

    pytest-timeout's and faulthandler's exits skip all cleanup here; ``setpriv --pdeathsig``
    (util-linux >= 2.33) then still sends mpirun SIGTERM, and mpirun ends its ranks.
    """
    if any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        pytest.skip("starts its own mpirun; run it with plain pytest, not under mpirun")
    cmd = ["mpirun", "-n", str(nprocs), sys.executable, *args]
    return ["setpriv", "--pdeathsig", "TERM", *cmd] if _setpriv_has_pdeathsig() else cmd


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
    cmd = mpi_command(nprocs, args)
    try:
        result = run_bounded(cmd, mpi_env(env), timeout, cwd)
    except subprocess.TimeoutExpired as exc:
        raise MpiRunTimeout(_describe(f"timed out after {timeout:g} s and was killed", cmd,
                                      exc.output or "", exc.stderr or "")) from None
    if check and result.returncode != 0:
        raise AssertionError(_describe(f"exited with status {result.returncode}", cmd,
                                       result.stdout, result.stderr))
    return result


def run_train(nprocs: int, *flags: str, timeout: float = 300,
              env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None,
              check: bool = False) -> subprocess.CompletedProcess[str]:
    """``run_mpi(nprocs, ["-m", "mpips.train", *flags], ...)``: one training job."""
    return run_mpi(nprocs, ["-m", "mpips.train", *flags], timeout=timeout, env=env, cwd=cwd,
                   check=check)


@contextlib.contextmanager
def mpi_job(nprocs: int, args: list[str], env: Mapping[str, str | None] | None = None,
            cwd: str | Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """Start ``mpirun -n nprocs <this python> *args`` to interact with while it runs.

    Yields the process with stdout (stderr merged into it) as a text pipe. Bound every wait
    on it (``communicate(timeout=...)``, a deadline while reading lines): leaving the block
    ends the job, ranks included, if it is still running.
    """
    with subprocess.Popen(mpi_command(nprocs, args), env=mpi_env(env), cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        try:
            yield proc
        finally:
            end_session(proc)


def signal_at_line(proc: subprocess.Popen[str], prefix: str, sig: int, wait: float = 90,
                   finish: float = 60) -> tuple[str, float]:
    """Read ``proc``'s output until a line starts with ``prefix``, send it ``sig``, let it end.

    Returns:
        All its output, and the seconds from the signal to its end.

    Args:
        proc: a process with stdout as a text pipe (``mpi_job``, or a job script).
        prefix: the line to wait for, e.g. ``"step 3/"``; AssertionError (with the output so far)
            if it has not come within ``wait`` seconds.
        sig: the signal sent then.
        finish: seconds the process then has to end (``subprocess.TimeoutExpired`` otherwise).
    """
    lines, deadline = [], time.monotonic() + wait
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            break
        assert time.monotonic() < deadline, "".join(lines)
    proc.send_signal(sig)
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=finish)
    return "".join(lines) + rest, time.monotonic() - t0


@functools.cache
def _setpriv_has_pdeathsig() -> bool:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return False
    usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=30)
    return "--pdeathsig" in usage.stdout


def _describe(what: str, cmd: list[str], stdout: str, stderr: str) -> str:
    def tail(text: str) -> str:
        return "\n".join(text.splitlines()[-TAIL_LINES:]) or "(empty)"

    return (f"`{' '.join(cmd)}` {what}\n--- stdout (last {TAIL_LINES} lines) ---\n"
            f"{tail(stdout)}\n--- stderr (last {TAIL_LINES} lines) ---\n{tail(stderr)}")

"""How a failure reads: bad input is said once, in one line, and exits 2; a crash ends the whole job.

Two kinds of failure, decided here for every entry point of a job (``mpips.train.main``):

- **Bad input** -- a configuration, launch, dataset or model the user can fix
  (``INPUT_ERRORS``). It is the same on every rank, so one rank (rank 0, or with a wrong launcher
  the process the launcher numbered 0) prints one line, ``mpips: bad <what>: <what is wrong and
  the fix>``, and every rank exits with status **2**. The traceback is printed only with
  ``--debug``. Before exiting, the ranks check that all of them saw bad input (a nonblocking
  barrier on a private communicator, ``AGREE_S`` seconds at most): where only some did, the
  others are somewhere else, maybe waiting in a collective, so a rank that saw it says so with
  its rank and host and aborts the job (status 2) instead of leaving them to hang.
- **A crash** -- anything else (a bug, an MPI failure, a dead peer): ``mpips.train`` prints one
  ``mpips: FATAL on rank R (host H, role)`` line after the traceback and aborts the whole job
  with status **1**.

Start-up steps that only some ranks perform (building the model: not on data servers) run
under ``agree(comm, step)``: every rank reaches its allgather, so all of them raise the same
bad input, or none does.

The flood of identical lines Open MPI prints when a peer dies is handled by
``mpips.stderr_filter``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

from mpips.config import ConfigError
from mpips.data.hdf5 import DatasetError
from mpips.layout import LayoutError
from mpips.models import ModelError
from mpips.tasks import LossError

__all__ = [
    "AGREE_S",
    "BAD_INPUT",
    "CRASH",
    "INPUT_ERRORS",
    "LaunchError",
    "Reporter",
    "agree",
    "check_launch",
    "speaks",
    "what",
]

BAD_INPUT, CRASH = 2, 1
AGREE_S = 10.0  # how long a rank with bad input waits for every other rank to report it too


class LaunchError(ValueError):
    """The launcher and the MPI library do not match: every process is alone in its world."""


INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, LaunchError, LayoutError, DatasetError, ModelError,
                                              LossError)
_WHAT = {ConfigError: "configuration", LaunchError: "launch", LayoutError: "configuration",
         DatasetError: "dataset", ModelError: "model", LossError: "loss"}

T = TypeVar("T")


def what(exc: BaseException) -> str:
    """"configuration", "launch", "dataset" or "model": what the user has to fix."""
    return next((name for cls, name in _WHAT.items() if isinstance(exc, cls)), "input")


class Reporter:
    """One rank's side of the failure policy above.

    Args:
        comm: the world; a private duplicate is made here (collective: call it where every rank
            is, before anything that can fail).
        speaker: whether this rank prints bad input (``speaks``).
        host: this rank's host name, for the line of a rank that aborts.
        debug: print tracebacks of bad input too.
        abort: ends the whole job with a status (default ``mpips.watchdog.abort_job`` on ``comm``).
    """

    def __init__(self, comm: Any, speaker: bool, host: str, debug: bool = False,
                 abort: Callable[[int], None] | None = None):
        self.world, self.comm = comm, comm.Dup()
        self.speaker, self.host, self.debug = speaker, host, debug
        self._abort = abort

    @contextlib.contextmanager
    def quiet_unless_speaker(self) -> Iterator[None]:
        """Only the speaker prints what the block writes (``--help``)."""
        if self.speaker:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield

    def bad_input(self, exc: BaseException, err: TextIO | None = None) -> int:
        """Report ``exc`` once and return 2; or, when not every rank saw bad input within
        ``AGREE_S``, say it with this rank and host and abort the job with status 2."""
        err = err if err is not None else sys.stderr
        line = f"mpips: bad {what(exc)}: {exc}"
        if self._everyone_agrees():
            if self.speaker:
                if self.debug:
                    print(getattr(exc, "traceback_text", "") or "".join(traceback.format_exception(exc)),
                          file=err, end="")
                print(line, file=err, flush=True)
            return BAD_INPUT
        if self.debug:
            traceback.print_exception(exc, file=err)
        print(f"{line} (seen on rank {self.comm.Get_rank()}, host {self.host}, but not on every rank within"
              f" {AGREE_S:g} s: aborting the job)", file=err, flush=True)
        if self._abort is not None:
            self._abort(BAD_INPUT)
        else:
            from mpips.watchdog import abort_job

            abort_job(self.world, BAD_INPUT)
        return BAD_INPUT

    def _everyone_agrees(self) -> bool:
        """Do all ranks reach this point within AGREE_S? (Only ranks with bad input come here.)"""
        req = self.comm.Ibarrier()
        deadline, delay = time.monotonic() + AGREE_S, 1e-4
        while not req.Test():
            if time.monotonic() > deadline:
                return False  # the request stays pending: the job is aborted next
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        return True


def agree(comm: Any, step: Callable[[], T], blocking: Callable[[str], Any] | None = None) -> T:
    """Run a start-up ``step`` on every rank and agree on bad input: collective over ``comm``.

    Bad input (``INPUT_ERRORS``) raised by ``step`` on any rank is raised on every rank, the one
    of the lowest such rank, with its traceback text in ``traceback_text`` (for ``--debug``).
    Anything else raised by ``step`` propagates at once (a crash: the caller aborts the job).

    Args:
        comm: the communicator every rank of the job is in.
        step: what to run; its result is returned.
        blocking: the watchdog's ``blocking(what)`` context, to bound the allgather.
    """
    try:
        result, problem = step(), None
    except INPUT_ERRORS as exc:
        kind = next(i for i, cls in enumerate(INPUT_ERRORS) if isinstance(exc, cls))
        result, problem = None, (kind, str(exc), "".join(traceback.format_exception(exc)))
    guard = blocking("start-up: every rank's verdict on the model and data (allgather over the world)") \
        if blocking is not None else contextlib.nullcontext()
    with guard:
        problems = comm.allgather(problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        kind, message, text = first
        exc = INPUT_ERRORS[kind](message)
        exc.traceback_text = text
        raise exc
    return result


def check_launch(size: int, environ: Mapping[str, str], vendor: tuple[str, tuple[int, ...]]) -> None:
    """LaunchError when the launcher started more processes than the MPI world holds.

    That is a launcher of another MPI than the one mpi4py uses (Debian's ``mpirun`` is whichever
    MPI update-alternatives picked), or ``srun`` without the PMI plugin this MPI needs: each
    process then initialises MPI alone, as rank 0 of a world of 1.

    Args:
        size: the world size MPI reports.
        environ: the environment (the launcher's variables).
        vendor: ``mpi4py.MPI.get_vendor()``: the MPI library mpi4py uses.
    """
    from mpips.doctor import launcher_claim, matching_launcher

    claim = launcher_claim(environ)
    if claim is None or claim.size == size:
        return
    name, version = vendor
    library = f"{name} {'.'.join(map(str, version))}"
    said = (f"{claim.launcher} started {claim.size} processes ({claim.size_var}={claim.size}), but MPI sees"
            f" a world of {size}: mpi4py here uses {library}, which cannot get its ranks from that launcher.")
    if claim.launcher == "srun":
        raise LaunchError(f"{said} Run `srun --mpi=pmix` or `srun --mpi=pmi2` (`srun --mpi=list` lists the"
                          f" plugins this Slurm has), or {name}'s own mpirun inside the allocation")
    own = matching_launcher(name)
    if own is not None:
        raise LaunchError(f"{said} Launch with {library}'s own launcher: `{own} -n {claim.size} python -m"
                          " mpips.train ...` (bash jobs/run.sh picks it)")
    raise LaunchError(f"{said} Put {name}'s mpirun first on PATH (`module load` it), or rebuild the"
                      " environment against the launcher's MPI: `MPICC=$(which mpicc) bash jobs/setup.sh`")


def speaks(rank: int, size: int, environ: Mapping[str, str]) -> bool:
    """Does this process print bad input? Rank 0; in a world of 1 that the launcher says is one
    of many, the process the launcher numbered 0 (all of them when it numbered none)."""
    from mpips.doctor import launcher_claim

    claim = launcher_claim(environ)
    if size == 1 and claim is not None and claim.size > 1:
        return claim.rank in (0, None)
    return rank == 0

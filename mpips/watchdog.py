"""Stall watchdog for blocking collectives (window creation, shutdown gathers, checkpoint writes).

The training loops poll with their own stall timeouts (``transport.wait_for``). A blocking MPI
collective cannot: if a peer never arrives it waits forever. So every such call runs inside
``Watchdog.blocking(what)``, and a daemon thread ends the whole job when one lasts longer than
the stall timeout, after printing what this rank was waiting for and since when.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from mpi4py import MPI

__all__ = ["Watchdog", "abort_job"]

# MPICH's launcher (Hydra) can end the job on MPI_Abort before it has forwarded what the aborting
# rank just wrote: with MPICH 4.0.2 the FATAL line was lost in 4 of 33 failed jobs (4 and 6 ranks
# on 2 cores), in none of 45 with this pause first. Open MPI forwards it either way.
ABORT_PAUSE_S = 0.2


def abort_job(comm: MPI.Comm, status: int = 1) -> None:
    """``comm.Abort(status)``, after a short pause that lets the launcher forward this rank's output."""
    time.sleep(ABORT_PAUSE_S)
    comm.Abort(status)


class Watchdog:
    """Aborts the job when a region marked ``blocking`` lasts longer than ``timeout`` seconds.

    Args:
        comm: the communicator to abort (the world).
        timeout: seconds (the run's ``--stall-timeout``).
        who: filled in with this rank's role (``who["role"]``) once it is known.
    """

    def __init__(self, comm: MPI.Comm, timeout: float, who: dict[str, str]):
        self.comm, self.timeout, self.who = comm, timeout, who
        self._lock = threading.Lock()
        self._waiting: tuple[str, float, float] | None = None  # (what, monotonic start, wall start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpips-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def blocking(self, what: str):
        """Mark a blocking call: ``what`` says which peers / collective / window it waits for."""
        with self._lock:
            outer, self._waiting = self._waiting, (what, time.monotonic(), time.time())
        try:
            yield
        finally:
            with self._lock:
                self._waiting = outer

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stop.wait(poll):
            with self._lock:
                waiting = self._waiting
            if waiting is None or time.monotonic() - waiting[1] <= self.timeout:
                continue
            what, start, wall = waiting
            since = time.strftime("%H:%M:%S", time.localtime(wall))
            print(
                f"mpips: FATAL on rank {self.comm.Get_rank()} (host {MPI.Get_processor_name()},"
                f" {self.who.get('role', 'role not yet assigned')}): StallError: no progress for"
                f" {time.monotonic() - start:.0f} s (--stall-timeout {self.timeout:g})"
                " while waiting"
                f" for {what}, since {since}",
                file=sys.stderr,
                flush=True,
            )
            abort_job(self.comm)

"""Session rules for mpips' tests: a multi-rank run never hangs; each world size runs its own tests.

Plain unit and end-to-end tests run with plain ``pytest``; tests marked
``@pytest.mark.mpi(min_size=K)`` run with ``mpirun -n K python -m pytest --with-mpi``
(pytest-mpi). Under ``--with-mpi`` with more than one rank this file adds:

- **Abort on the first failure.** A failed test or collection on any rank prints its report
  to stderr, each line prefixed ``[rank r/n]``, and calls ``MPI.COMM_WORLD.Abort(1)``. Without
  it the other ranks wait forever in a collective the failed rank never reaches, and the
  report is never printed.
- **One report.** Ranks other than 0 print nothing of pytest's progress and summary. What
  other threads write to their terminal still reaches stderr, rank-prefixed: that is
  pytest-timeout's stack dump when a test outlives ``timeout`` (setup.cfg).
- Behind both, setup.cfg's ``faulthandler_timeout`` with ``faulthandler_exit_on_timeout``: a
  watchdog that needs no GIL dumps every thread's stack and exits. It is what ends a rank
  blocked in a lowercase ``comm.allreduce``, which holds the GIL, so that pytest-timeout's
  thread cannot run there (and its signal method never fires inside MPI).

**Exact sizes** (``MPIPS_EXACT_SIZE=1``, used by ``jobs/test.sh``): a test marked ``mpi`` runs
only when the world size is in its ``sizes=(...)`` (default ``(min_size,)``); every other
test, unmarked ones included, is deselected, so running sizes 1, 2, 4 and 6 in turn runs each
test exactly at the sizes it lists.

mpi4py is imported only under ``--with-mpi``: plain pytest never initialises MPI here.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from typing import Any

import pytest


def mpi_sizes(marker: pytest.Mark) -> tuple[int, ...]:
    """The world sizes an ``mpi`` marker asks for: ``sizes=...``, else ``(min_size,)``, else 1."""
    min_size = marker.kwargs.get("min_size", 1)
    sizes = tuple(marker.kwargs.get("sizes", (min_size,)))
    if not sizes or min(sizes) < min_size:
        raise pytest.UsageError(f"@pytest.mark.mpi: sizes={sizes} must all be >= min_size")
    return sizes


def _prefixed(prefix: str, text: str) -> str:
    return "".join(f"{prefix}{line}\n" for line in text.splitlines())


class AbortOnFailure:
    """Ends the whole MPI job at the first failed report on this rank."""

    def __init__(self, config: pytest.Config, comm: Any) -> None:
        self.config = config
        self.comm = comm

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self._abort(report, f"{report.nodeid} failed in {report.when}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._abort(report, f"collecting {report.nodeid or 'the session'} failed")

    def _abort(self, report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
        size = self.comm.Get_size()
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        parts = [f"{what}; aborting all {size} ranks", report.longreprtext]
        for title, content in report.sections:  # the test's captured output and log
            parts += [f"----- {title} -----", content]
        sys.stdout.flush()
        sys.stderr.write(_prefixed(f"[rank {self.comm.Get_rank()}/{size}] ", "\n".join(parts)))
        sys.stderr.flush()
        self.comm.Abort(1)


class OtherThreadsToStderr(io.TextIOBase):
    """Terminal for ranks other than 0: drops pytest's report, which the main thread writes,
    and passes on what any other thread writes (pytest-timeout's dump) to stderr, a whole
    prefixed line at a time so that lines of different ranks do not splice."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if threading.current_thread() is not threading.main_thread():
            lines = (self.partial + text).split("\n")
            self.partial = lines.pop()
            for line in lines:
                sys.__stderr__.write(f"{self.prefix}{line}\n")
            sys.__stderr__.flush()
        return len(text)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("with_mpi", default=False):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return
    config.pluginmanager.register(AbortOnFailure(config, comm), "mpips-abort-on-failure")
    if comm.Get_rank() != 0:
        # Replaced, not removed: pytest-timeout writes through the terminal reporter.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        config.pluginmanager.unregister(reporter)
        quiet = OtherThreadsToStderr(f"[rank {comm.Get_rank()}/{comm.Get_size()}] ")
        config.pluginmanager.register(pytest.TerminalReporter(config, quiet), "terminalreporter")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("with_mpi", default=False) or os.environ.get("MPIPS_EXACT_SIZE") != "1":
        return
    from mpi4py import MPI

    size = MPI.COMM_WORLD.Get_size()
    selected, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("mpi")
        (selected if marker is not None and size in mpi_sizes(marker) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected

"""The test harness itself: a failing or hung rank ends the whole run, quickly and legibly.

The ``deliberate_*`` tests misbehave on purpose and only when ``MPIPS_DELIBERATE_FAILURE=1``;
the plain tests below run them under mpirun and check how the run ends. The bounds are far
above what they take (about 3 s for 2 ranks here) yet far below "forever".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import MpiRunTimeout, run_mpi

DELIBERATE = os.environ.get("MPIPS_DELIBERATE_FAILURE") == "1"
deliberate = pytest.mark.skipif(not DELIBERATE, reason="set MPIPS_DELIBERATE_FAILURE=1")
MESSAGE = "deliberate failure 5e1f: rank 1 disagrees"
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "--with-mpi", "-q"]
ABORT_WITHIN_S = 30


@pytest.mark.mpi(sizes=(1, 2, 4, 6))
def test_every_rank_collects_the_same_tests(request):
    """Ranks that selected different tests would pair up different collectives."""
    from mpi4py import MPI

    ids = [item.nodeid for item in request.session.items]
    assert MPI.COMM_WORLD.allgather(ids) == [ids] * MPI.COMM_WORLD.Get_size()


@deliberate
@pytest.mark.mpi(min_size=2, sizes=(2, 4))
def test_deliberate_assertion_on_rank_1():
    """Rank 1 fails while every other rank waits in a GIL-holding lowercase allreduce."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 1:
        raise AssertionError(MESSAGE)
    comm.allreduce(1)
    comm.barrier()


@deliberate
@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_deliberate_hang_on_rank_1():
    """Rank 1 sleeps past the test timeout while rank 0 waits in a lowercase allreduce."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 1:
        time.sleep(600)
    comm.allreduce(1)


@deliberate
@pytest.mark.mpi(min_size=2, sizes=(2,))
def test_deliberate_deadlock_holding_the_gil():
    """Both ranks block in lowercase allreduces that never match, each holding its GIL."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    other = comm.Dup()
    (comm if comm.Get_rank() == 0 else other).allreduce(1)


def _run_deliberately(nprocs: int, test: str, *options: str):
    start = time.monotonic()
    result = run_mpi(nprocs, [*PYTEST, *options, f"{__file__}::{test}"], timeout=120,
                     env={"MPIPS_DELIBERATE_FAILURE": "1", "MPIPS_EXACT_SIZE": None})
    return result, time.monotonic() - start


@pytest.mark.parametrize("nprocs", [2, 4])
def test_a_failing_rank_aborts_every_rank(nprocs):
    result, wall = _run_deliberately(nprocs, "test_deliberate_assertion_on_rank_1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert wall < ABORT_WITHIN_S, output
    assert f"[rank 1/{nprocs}] " in output, output
    assert MESSAGE in output, output
    assert f"aborting all {nprocs} ranks" in output, output


def test_a_timed_out_rank_ends_the_run_and_shows_its_stack():
    result, wall = _run_deliberately(2, "test_deliberate_hang_on_rank_1", "-o", "timeout=3")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert wall < ABORT_WITHIN_S, output
    # pytest-timeout's dump from rank 1, passed through although rank 1's report is silenced.
    assert "[rank 1/2] " in output and "Timeout" in output, output
    assert "time.sleep(600)" in output, output


def test_a_deadlock_inside_mpi_ends_by_the_gil_free_watchdog():
    result, wall = _run_deliberately(2, "test_deliberate_deadlock_holding_the_gil",
                                     "-o", "timeout=60", "-o", "faulthandler_timeout=3")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert wall < ABORT_WITHIN_S, output
    assert "Timeout (0:00:03)!" in output, output
    assert "allreduce(1)" in output or "test_deliberate_deadlock_holding_the_gil" in output, output


@pytest.mark.parametrize("nprocs, expected", [
    (1, {"test_every_rank_collects_the_same_tests"}),
    (2, {"test_every_rank_collects_the_same_tests", "test_deliberate_assertion_on_rank_1",
         "test_deliberate_hang_on_rank_1", "test_deliberate_deadlock_holding_the_gil"}),
    (4, {"test_every_rank_collects_the_same_tests", "test_deliberate_assertion_on_rank_1"}),
])
def test_exact_size_selects_each_test_at_its_sizes_only(nprocs, expected):
    result = run_mpi(nprocs, [*PYTEST, "--collect-only", __file__], timeout=120,
                     env={"MPIPS_EXACT_SIZE": "1"}, check=True)
    collected = {line.split("::")[-1] for line in result.stdout.splitlines() if "::" in line}
    assert collected == expected, result.stdout


def test_run_mpi_kills_every_rank_on_timeout():
    """Even ranks that ignore SIGTERM: they are in their own process groups, not mpirun's."""
    marker = f"mpips-harness-{os.getpid()}-{time.monotonic_ns()}"
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"time.sleep(600)  # {marker}")
    start = time.monotonic()
    with pytest.raises(MpiRunTimeout, match="timed out after 3 s and was killed"):
        run_mpi(2, ["-c", code], timeout=3)
    assert time.monotonic() - start < ABORT_WITHIN_S
    deadline = time.monotonic() + 5
    while _command_lines_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _command_lines_with(marker) == []


def _command_lines_with(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found

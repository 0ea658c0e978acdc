"""The stderr filter that keeps a dead peer from flooding the terminal. No MPI."""

import os
import subprocess
import sys

from helpers import REPO

from mpips.stderr_filter import collapse_repeats

FLOOD = "[vm:5283] Read -1, expected 64, errno = 3\n"


def test_repeated_open_mpi_lines_are_shown_twice_then_counted():
    lines = ["step 20/200 loss 0.99\n", *[FLOOD] * 5000, "mpips: FATAL on rank 0\n", "[vm:5284] other\n"]
    assert list(collapse_repeats(lines)) == [
        "step 20/200 loss 0.99\n",
        FLOOD,
        FLOOD,
        FLOOD.rstrip() + " (repeats; further copies not shown)\n",
        "mpips: FATAL on rank 0\n",
        "[vm:5284] other\n",
        FLOOD.rstrip() + " (4,998 copies not shown)\n",
    ]


def test_other_lines_pass_however_often_they_repeat():
    lines = ["same\n"] * 10 + ["Traceback (most recent call last):\n"] * 4 + ["no newline at the end"]
    assert list(collapse_repeats(lines)) == lines


def test_installed_filter_collapses_what_the_process_writes_to_fd_2():
    """What the MPI library writes (fd 2, not sys.stderr) is filtered too, and nothing else is lost."""
    code = (
        "import os, sys\n"
        "from mpips.stderr_filter import install\n"
        "assert install()\n"
        "print('python line', file=sys.stderr, flush=True)\n"
        f"for _ in range(20000): os.write(2, {FLOOD.encode()!r})\n"
        "os.write(2, b'last line, no newline, bytes \\xff kept')\n"
        "os._exit(0)\n"  # no cleanup: as if killed
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0
    assert done.stderr.decode(errors="surrogateescape").splitlines() == [
        "python line",
        FLOOD.rstrip(),
        FLOOD.rstrip(),
        FLOOD.rstrip() + " (repeats; further copies not shown)",
        "last line, no newline, bytes \udcff kept",
        FLOOD.rstrip() + " (19,998 copies not shown)",
    ]


def test_filter_can_be_switched_off():
    env = dict(os.environ, PYTHONPATH=str(REPO), MPIPS_STDERR_FILTER="0")
    code = ("import os\nfrom mpips.stderr_filter import install\nassert not install()\n"
            f"os.write(2, {FLOOD.encode()!r} * 5)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == FLOOD * 5


def test_filter_outlives_the_signals_a_launcher_sends_the_process_group():
    """mpirun forwards SIGUSR1 (checkpoint and stop) to the rank's group: the rank must still be
    able to write to stderr afterwards."""
    code = (
        "import os, signal, sys, time\n"
        "from mpips.stderr_filter import install\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "assert install()\n"
        "time.sleep(0.5)\n"  # the child has installed its handlers
        "os.killpg(os.getpgrp(), signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"
        "print('still here', file=sys.stderr, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert (done.returncode, done.stderr) == (0, "still here\n")

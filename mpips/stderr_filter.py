"""Keep a dead peer from flooding the terminal: collapse Open MPI's repeated native error lines.

When a process dies while another reads its memory one-sidedly, Open MPI 4's shared-memory
transport (btl/vader, single-copy reads through CMA ``process_vm_readv``) prints
``[host:pid] Read -1, expected 64, errno = 3`` (ESRCH: no such process) for every failed read
and retries at once, inside one ``MPI_Rget``, until mpirun ends the job: measured 1,600-11,600
such lines per job on 2-4 ranks, for about a second (mpirun waits ``odls_base_sigkill_timeout``,
1 s, before it signals the survivors). No MCA parameter silences it: ``opal_output(0, ...)``
always prints, and ``btl_vader_single_copy_mechanism=none`` removes the one-sided windows mpips
pulls through (``MPI_ERR_WIN``). Open MPI 5 prints it only at a raised verbosity.

So ``install()`` (called by ``mpips.train`` on every rank under Open MPI) routes the process's
file descriptor 2 through a child process, ``python -m mpips.stderr_filter``, that passes every
line on but shows an Open MPI line (``[host:pid] ...``) at most ``KEEP`` times and then says how
many more it dropped. The child reads until every writer has closed the pipe, so it forwards
all the process wrote even when that process is killed. Stdlib only: the child starts in
milliseconds. Off with ``MPIPS_STDERR_FILTER=0``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping

__all__ = ["KEEP", "collapse_repeats", "install"]

KEEP = 2  # times an identical Open MPI line is shown before the rest are only counted
_installed: list[bool] = []  # one filter per process: fd 2 is process-wide
_NATIVE_LINE = re.compile(r"^\[[^\]\s]+:\d+\] ")  # Open MPI's opal_output prefix: [host:pid]


def collapse_repeats(lines: Iterable[str], keep: int = KEEP) -> Iterator[str]:
    """Every line, except that an Open MPI line (``[host:pid] ...``) already seen ``keep`` times is
    dropped: the first one dropped is replaced by a note saying so (the job may be killed before
    the end), and at the end one line per such message says how many were dropped in all.
    """
    seen: dict[str, int] = {}
    ended = True  # whether the last line shown ended with a newline
    for line in lines:
        if _NATIVE_LINE.match(line):
            count = seen[line] = seen.get(line, 0) + 1
            if count == keep + 1:
                yield f"{line.rstrip()} (repeats; further copies not shown)\n"
            if count > keep:
                continue
        yield line
        ended = line.endswith(("\n", "\r"))
    for line, count in seen.items():
        if count > keep:
            yield f"{'' if ended else chr(10)}{line.rstrip()} ({count - keep:,} copies not shown)\n"
            ended = True


def install(environ: Mapping[str, str] = os.environ) -> bool:
    """Route this process's stderr (fd 2: Python and the MPI library alike) through the filter.

    Returns:
        Whether it did (not with ``MPIPS_STDERR_FILTER=0``, or where the child cannot start).
    """
    if environ.get("MPIPS_STDERR_FILTER", "1") == "0":
        return False
    if _installed:  # fd 2 of this process goes through a filter already (mpips.init called again)
        return True
    sys.stderr.flush()
    read, write = os.pipe()
    original = os.dup(2)
    try:
        subprocess.Popen(
            [sys.executable, "-u", "-m", "mpips.stderr_filter"],
            stdin=read, stdout=original, stderr=subprocess.DEVNULL, close_fds=True, env=dict(environ),
        )
    except OSError:
        os.close(write)
        return False
    finally:
        os.close(read)
        os.close(original)
    os.dup2(write, 2)
    os.close(write)
    _installed.append(True)
    return True


def main() -> None:
    """The child: stdin -> ``collapse_repeats`` -> stdout, line by line, bytes kept as they were.

    It ignores the signals a launcher sends its process's group: SIGUSR1 and SIGTERM ask the job
    to checkpoint (a dead filter would turn the rank's next write to stderr into BrokenPipeError),
    and after the SIGTERM that ends a job it still forwards what is left. It ends when the pipe
    does, or on SIGKILL.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    source = io.TextIOWrapper(sys.stdin.buffer, errors="surrogateescape", newline="")
    out = io.TextIOWrapper(sys.stdout.buffer, errors="surrogateescape", newline="", line_buffering=True)
    try:
        for line in collapse_repeats(iter(source.readline, "")):
            out.write(line)
            out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()

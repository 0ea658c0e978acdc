"""Fail fast, never hang: an injected fault on any rank, role and phase ends the whole job.

Each test runs a real job under mpirun with ``MPIPS_FAULT`` set (see ``mpips/faults.py``) and
asserts that the job ended within 30 s of the fault, with a non-zero status and a message that
names the right rank, host and role, and for a stall what the rank was waiting for.

Layouts: ``-n 3 --data-servers 0`` = ranks 0, 1 workers 0, 1 and rank 2 server 0;
``-n 4`` (one data server) = ranks 0, 1 workers, rank 2 data server 0, rank 3 server 0.
"""

from __future__ import annotations

import re
import time

import pytest
from helpers import run_train

from mpips.faults import Fault, parse

LIMIT = 30.0  # seconds from the fault to the end of the job
BASE = ("--steps", "8", "--stall-timeout", "4", "--log-every", "100")
SMALL = ("--data-servers", "0")


def fatal(rank: int, role: str, cause: str) -> str:
    """The one-line report train.main / the watchdog print for a failure on ``rank``."""
    return rf"mpips: FATAL on rank {rank} \(host \S+, {role}\): {cause}"


# id, ranks, MPIPS_FAULT, extra flags, patterns the output must contain
CASES = [
    (
        "raise-worker-push",
        3,
        "rank=1,phase=push,step=3,kind=raise",
        SMALL,
        [fatal(1, "worker 1", "FaultInjected: injected fault at rank 1, phase push, step 3")],
    ),
    (
        "raise-worker-eval",
        3,
        "rank=0,phase=evaluation,kind=raise",
        (*SMALL, "--eval-every", "2"),
        [fatal(0, "worker 0", "FaultInjected: injected fault at rank 0, phase evaluation, step 2")],
    ),
    (
        "raise-dataserver-data",
        4,
        "rank=2,phase=data,step=3,kind=raise",
        (),
        [fatal(2, "data-server 0", "FaultInjected")],
    ),
    (
        "exit-server-startup",
        3,
        "rank=2,phase=start-up,kind=exit",
        SMALL,
        [r"Process name: \[\[\d+,1\],2\]", r"Exit code:\s+3"],
    ),  # before the role map is printed
    (
        "kill-worker-pull",
        3,
        "rank=0,phase=pull,step=4,kind=kill",
        SMALL,
        [
            r"process rank 0 with PID \d+ on node \S+ exited on signal 9",
            r"\n\s+0\s+\S+\s+worker\s+0",
        ],
    ),
    (
        "hang-worker-data",
        3,
        "rank=1,phase=data,step=2,kind=hang",
        SMALL,
        [
            r"StallError: .*waiting for\s+workers \[1\]"
            r"|StallError: .*server 0: no push .* workers \[1\]"
        ],
    ),
    # a hung server: the workers' pulls stall, naming the clock they wait for
    (
        "hang-server-push",
        3,
        "rank=2,phase=push,step=3,kind=hang",
        SMALL,
        [
            r"FATAL on rank [01] \(host \S+, worker [01]\): StallError: no progress for 4 s"
            r" while waiting"
            r" for the servers to reach clock 4 .*server 0 \(rank \d .*\) at clock 3, since \d\d:"
        ],
    ),
    # hangs outside the training loop: blocked collectives, ended by the watchdog thread
    (
        "hang-worker-startup",
        3,
        "rank=0,phase=start-up,kind=hang",
        SMALL,
        [
            r"FATAL on rank [012] \(host \S+, (worker [01]|server 0)\):"
            r" StallError: .*waiting for start-up"
        ],
    ),
    (
        "hang-server-shutdown",
        3,
        "rank=2,phase=shutdown,kind=hang",
        SMALL,
        # the workers' watchdogs, or the hung server's own, whichever fires first
        [
            r"FATAL on rank [012] \(host \S+, (worker [01]|server 0)\):"
            r" StallError: .*waiting for shutdown: .*since \d\d:"
        ],
    ),
    (
        "malformed-worker-push",
        3,
        "rank=1,phase=push,step=2,kind=malformed",
        SMALL,
        [fatal(2, "server 0", "MalformedMessage: malformed push from worker 1: bad magic")],
    ),
    (  # the same when the push is streamed during backward: its header goes before backward
        "malformed-worker-push-streamed",
        3,
        "rank=1,phase=push,step=2,kind=malformed",
        (*SMALL, "--chunk-bytes", "4096"),
        [fatal(2, "server 0", "MalformedMessage: malformed push from worker 1: bad magic")],
    ),
    (  # streamed with topk: the first record is the last chunk sent, from a gradient hook
        "malformed-payload-worker-push-topk-streamed",
        3,
        "rank=1,phase=push,step=2,kind=malformed-payload",
        (*SMALL, "--compress", "topk", "--chunk-bytes", "1000"),
        [fatal(2, "server 0", r"MalformedMessage: server 0: malformed topk push from worker 1 for step 2:"
                              r" chunk 0 \(elements 0\.\.\d+\): record for \d+ elements, the chunk has \d+")],
    ),
    (  # a compressed push whose first record announces the wrong element count: refused, never applied
        "malformed-payload-worker-push-topk",
        3,
        "rank=1,phase=push,step=2,kind=malformed-payload",
        (*SMALL, "--compress", "topk"),
        [fatal(2, "server 0", r"MalformedMessage: server 0: malformed topk push from worker 1 for step 2:"
                              r" chunk 0 \(elements 0\.\.\d+\): record for \d+ elements, the chunk has \d+")],
    ),
]


@pytest.mark.parametrize(
    "ranks,fault,flags,patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_fault_ends_the_job(ranks, fault, flags, patterns):
    start = time.time()
    result = run_train(ranks, *BASE, *flags, env={"MPIPS_FAULT": fault}, timeout=LIMIT + 60)
    end = time.time()
    out = result.stdout + result.stderr
    fired = re.search(r"mpips: MPIPS_FAULT: .* \(at (\d+\.\d+)\)", out)
    assert fired, f"the fault {fault} never fired:\n{out[-3000:]}"
    assert result.returncode != 0, out[-3000:]
    assert end - float(fired.group(1)) < LIMIT, (
        f"job took {end - float(fired.group(1)):.1f} s after the fault"
    )
    for pattern in patterns:
        assert re.search(pattern, out), f"no {pattern!r} in:\n{out[-3000:]}"
    assert end - start < LIMIT + 30


def test_a_dead_server_does_not_flood_the_terminal():
    """kill -9 of the parameter server while the workers read its window: Open MPI 4's shared-memory
    transport prints a line per failed read and retries at once until mpirun ends the job (3,000 to
    11,600 lines measured, mpips.stderr_filter). The job still ends at once, naming the dead rank."""
    start = time.time()
    result = run_train(3, *BASE, *SMALL, env={"MPIPS_FAULT": "rank=2,phase=push,step=3,kind=kill"},
                       timeout=LIMIT + 60)
    out = result.stdout + result.stderr
    assert re.search(r"mpips: MPIPS_FAULT: kill at rank 2", out), out[-3000:]
    assert result.returncode != 0
    assert re.search(r"process rank 2 with PID \d+ on node \S+ exited on signal 9", out), out[-3000:]
    lines = out.splitlines()
    assert len(lines) < 50, f"{len(lines)} lines:\n" + "\n".join(lines[:60])
    repeats = [line for line in lines if re.match(r"\[\S+:\d+\] ", line)]
    assert len(repeats) <= 2 * 4, repeats  # per worker: the line twice, a note, maybe a count
    assert time.time() - start < LIMIT + 30


def test_fault_spec_parses_and_rejects():
    assert parse("rank=2,phase=push,step=5,kind=kill") == Fault(
        rank=2, phase="push", step=5, kind="kill"
    )
    assert parse("rank=0, phase=start-up") == Fault(rank=0, phase="start-up")
    for bad in (
        "phase=push",
        "rank=1,phase=lunch",
        "rank=1,phase=push,kind=explode",
        "rank=1,phase=push,x=1",
    ):
        with pytest.raises(ValueError, match="MPIPS_FAULT"):
            parse(bad)


def test_unarmed_hook_is_free(monkeypatch):
    from mpips import faults

    monkeypatch.delenv("MPIPS_FAULT", raising=False)
    faults.armed.cache_clear()
    try:
        t0 = time.perf_counter()
        for step in range(100_000):
            faults.at("push", step)
        assert time.perf_counter() - t0 < 1.0
    finally:
        faults.armed.cache_clear()

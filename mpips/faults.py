"""Test-only fault injection: make one rank fail in a chosen way at a chosen phase and step.

The switch is the environment variable ``MPIPS_FAULT``, read in one place (``armed()``), once per
process. Unset (the normal case) every hook is a cached no-op. Example::

    MPIPS_FAULT="rank=2,phase=push,step=5,kind=kill" mpirun -n 4 python -m mpips.train ...

Fields (comma-separated ``key=value``):
    rank   world rank that fails (required).
    phase  one of PHASES (required).
    step   the global step at which it fails (default: the first time the phase is reached).
    kind   raise | exit | kill | hang | malformed | malformed-payload (default raise):
           raise = an exception (the normal error path); exit = ``os._exit(3)`` without MPI
           finalisation; kill = SIGKILL to itself; hang = sleep forever (other ranks' stall
           timeouts must end the job); malformed = corrupt the first 4 bytes (the magic number)
           of the header of the message being sent (only where the hook is given ``header=``: a
           worker's push), and carry on; malformed-payload = the same for the first 4 bytes of
           its payload (only where the hook is given ``payload=``): a compressed push's first
           record then announces the wrong element count. A push streamed during backward has
           its header hook where it begins and its payload hook where its first chunk (sent
           last) is copied; a one-message push gives both to one hook.

Roles call ``faults.at(phase, step)`` at each phase; the hooks are one line each.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ENV", "KINDS", "PHASES", "Fault", "FaultInjected", "armed", "at", "parse"]

ENV = "MPIPS_FAULT"
PHASES = ("start-up", "pull", "push", "data", "evaluation", "checkpoint", "shutdown")
KINDS = ("raise", "exit", "kill", "hang", "malformed", "malformed-payload")


class FaultInjected(RuntimeError):
    """The error a ``kind=raise`` fault raises."""


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One injected fault: ``kind`` on world rank ``rank`` at ``phase`` (and ``step``, if set)."""

    rank: int
    phase: str
    step: int | None = None
    kind: str = "raise"

    def matches(self, rank: int, phase: str, step: int | None) -> bool:
        return (
            rank == self.rank and phase == self.phase and (self.step is None or step == self.step)
        )


def parse(text: str) -> Fault:
    """Parse an ``MPIPS_FAULT`` value; ValueError naming the bad field."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("rank", "phase", "step", "kind"):
            raise ValueError(f"{ENV}: bad item {item!r}; expected rank=, phase=, step=, kind=")
        fields[key] = value.strip()
    if "rank" not in fields or "phase" not in fields:
        raise ValueError(f"{ENV}: rank= and phase= are required, got {text!r}")
    if fields["phase"] not in PHASES:
        raise ValueError(f"{ENV}: phase {fields['phase']!r} is not one of {', '.join(PHASES)}")
    kind = fields.get("kind", "raise")
    if kind not in KINDS:
        raise ValueError(f"{ENV}: kind {kind!r} is not one of {', '.join(KINDS)}")
    step = fields.get("step")
    return Fault(
        rank=int(fields["rank"]), phase=fields["phase"], step=int(step) if step else None, kind=kind
    )


@functools.cache
def armed() -> Fault | None:
    """The fault configured for this process, or None. The one place ``MPIPS_FAULT`` is read."""
    text = os.environ.get(ENV, "").strip()
    return parse(text) if text else None


def _world_rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else -1


_fired: set[str] = set()  # phases that already fired a 'malformed' fault (it does not end the rank)


def at(phase: str, step: int | None = None, *, header: np.ndarray | None = None,
       payload: np.ndarray | None = None) -> None:
    """Hook: inject the armed fault if it is for this rank, ``phase`` and ``step``.

    Args:
        phase: one of PHASES.
        step: the global step the caller is at (None where steps do not apply).
        header: the packed header bytes of a message about to be sent; a ``malformed`` fault
            corrupts its first 4 bytes in place.
        payload: payload bytes about to be sent; a ``malformed-payload`` fault corrupts its
            first 4 bytes in place.
    """
    fault = armed()
    if fault is None or not fault.matches(_world_rank(), phase, step):
        return
    where = f"rank {fault.rank}, phase {phase}, step {step}"
    if fault.kind in ("malformed", "malformed-payload"):
        target = header if fault.kind == "malformed" else payload
        if target is None or phase in _fired:
            return
        _fired.add(phase)
        target[:4] ^= np.uint8(0xFF)  # header: the magic number; the receiver must refuse it
        _say(f"corrupting the {'header' if fault.kind == 'malformed' else 'payload'} of the message sent at {where}")
        return
    if header is None and payload is not None:
        return  # the rest of a push that began at its header's hook, where this fault fired
    _say(f"{fault.kind} at {where}")
    if fault.kind == "raise":
        raise FaultInjected(f"injected fault at {where}")
    if fault.kind == "exit":
        os._exit(3)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: asleep, costs nothing; only an abort from elsewhere ends it
        time.sleep(3600)


def _say(text: str) -> None:
    # the wall-clock time lets a test measure how long the job took to end after the fault
    print(f"mpips: {ENV}: {text} (at {time.time():.3f})", file=sys.stderr, flush=True)

"""Stopping: stop signals become a stop at the next step boundary, and the job's exit statuses."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["REQUEUE_STATUS", "STOPPED_STATUS", "WRITE_FAILED_STATUS", "Preemption"]

REQUEUE_STATUS = 75  # EX_TEMPFAIL: "checkpointed, requeue me" (jobs/slurm scripts requeue on it)
STOPPED_STATUS = 143  # 128 + SIGTERM: stopped cleanly on a signal, without a checkpoint to resume from
WRITE_FAILED_STATUS = 74  # EX_IOERR: a checkpoint could not be written (disk full, quota, read-only, I/O error)


class Preemption:
    """SIGTERM / SIGUSR1 / SIGINT set a flag; the job stops at the next step boundary.

    With checkpoints on it writes one there and exits ``REQUEUE_STATUS``; without, it stops
    cleanly (every rank, the model saved where ``--save`` asks) and exits ``STOPPED_STATUS``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    @classmethod
    def install(cls) -> Preemption:
        """Handle the stop signals from now on; one held since start-up (``mpips.launch``) counts."""
        from mpips.launch import take_held_signal

        p = cls()
        for sig in cls.SIGNALS:
            signal.signal(sig, p._handle)
        held = take_held_signal()
        if held:
            p.requested, p.signal_name = True, held
        return p

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name



"""Control messages of a job: small pickled tuples between roles, outside any model's traffic.

A worker tells the servers a registration is coming (``("register", n)``, from worker 0), tells
the data servers a loader is opened (``("loader", request)``) and everyone it is done
(``("finish", w)``); a serve loop polls for them between pushes (``poll_control``).
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpips.transport.wire import Tag

__all__ = ["poll_control", "send_control"]


def send_control(comm: MPI.Comm, dest: int, message: tuple[Any, ...]) -> None:
    """Send ``message`` (a small picklable tuple) to rank ``dest`` of ``comm``; it is buffered
    (a few bytes: MPI's eager protocol), so this returns at once."""
    comm.send(message, dest=dest, tag=Tag.CONTROL)


def poll_control(comm: MPI.Comm) -> tuple[Any, ...] | None:
    """The next control message from any rank of ``comm``, or None if none has come."""
    message = comm.improbe(source=MPI.ANY_SOURCE, tag=Tag.CONTROL)
    return None if message is None else message.recv()

"""bsp notices: "your step is applied" as a message (``NoticeSender`` -> ``NoticeReceiver``).

A notice is ``NOTICE_WORDS`` int64: clock, exposed buffer index, version, buckets exposed
(``WHOLE``: all, a published version), checkpoint mark.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from mpips.transport.chunked import Backoff, wait_all, wait_for
from mpips.transport.wire import NOTICE_WORDS, WHOLE, Tag

__all__ = [
    "NoticeReceiver",
    "NoticeSender",
]


class NoticeSender:
    """bsp server: tell every worker what is readable, as messages.

    After each publish: the clock, the exposed buffer that holds the version and its number
    (``send``). While a version is being applied bucket by bucket (``ParameterWindow``'s lazy
    update), after each bucket: how many of its buckets are exposed so far (``send_partial``), so
    a worker can pull them while the server applies the rest (``mpips.client.pullahead``). Every
    notice carries the checkpoint mark of the version (``Slot.CHECKPOINT``). A waiting worker
    learns what it waits for from a message it polls cheaply (``Backoff.for_messages``) instead
    of reading every server's status blocks under locks. ``close(w)`` sends worker ``w`` the
    last notice (clock -1) once it has stopped, so it can receive every notice before it frees
    its receive; ``finish()`` waits for every notice to be received.
    """

    def __init__(self, comm: MPI.Comm, workers: list[int]):
        self.comm, self.workers = comm, workers
        self.sending: deque[tuple[np.ndarray, MPI.Request]] = deque()  # buffers stay alive until sent
        self.closed: set[int] = set()

    def _send(self, w: int, words: tuple[int, ...]) -> None:
        while self.sending and self.sending[0][1].Test():
            self.sending.popleft()
        buf = np.array(words, dtype=np.int64)
        self.sending.append((buf, self.comm.Isend(buf, dest=self.workers[w], tag=Tag.NOTICE)))

    def send(self, clock: int, buffer: int, version: int, mark: int = 0) -> None:
        """Version ``version`` (clock ``clock``) is published whole in exposed buffer ``buffer``."""
        self.send_partial(clock, buffer, version, WHOLE, mark)

    def send_partial(self, clock: int, buffer: int, version: int, exposed: int, mark: int = 0) -> None:
        """The first ``exposed`` buckets of version ``version`` are readable in ``buffer``."""
        for w in range(len(self.workers)):
            if w not in self.closed:
                self._send(w, (clock, buffer, version, exposed, mark))

    def ack(self, w: int, clock: int) -> None:
        """asp/ssp: worker ``w``'s pushes of steps ``< clock`` are applied (its newest version holds them)."""
        if w not in self.closed:
            self._send(w, (clock, 0, clock, WHOLE, 0))

    def close(self, w: int) -> None:
        self._send(w, (-1, 0, 0, 0, 0))
        self.closed.add(w)

    def finish(self, timeout: float) -> None:
        wait_all([r for _, r in self.sending], "every worker to receive its last notice", timeout)
        self.sending.clear()


class NoticeReceiver:
    """bsp worker: the latest notices of every server (see ``NoticeSender``).

    Per server: ``clock``, ``buffer`` and ``version`` of the newest version published whole;
    ``next_clock``, ``next_buffer`` and ``exposed`` (buckets readable) of the
    version being applied after it, if any (``exposed`` 0: none); ``mark``, the checkpoint mark
    of the newest notice.
    """

    def __init__(self, comm: MPI.Comm, servers: list[int]):
        self.comm, self.servers = comm, servers
        n = len(servers)
        # at first what every window holds from its creation (ParameterWindow: buffer 0, version
        # 0, clock 0), so step 0 need not wait for a server's start-up
        self.clock = np.zeros(n, dtype=np.int64)
        self.buffer = [0] * n
        self.version = np.zeros(n, dtype=np.int64)
        self.next_clock = np.full(n, -1, dtype=np.int64)
        self.next_buffer = [0] * n
        self.exposed = np.zeros(n, dtype=np.int64)
        self.mark = np.zeros(n, dtype=np.int64)
        self.ended = [False] * n
        self._bufs = [np.zeros(NOTICE_WORDS, dtype=np.int64) for _ in servers]
        self._reqs = [self.comm.Irecv(b, source=s, tag=Tag.NOTICE) for b, s in zip(self._bufs, servers, strict=True)]

    def poll(self) -> bool:
        """Take every notice that has come; True if any did."""
        moved = False
        for i, req in enumerate(self._reqs):
            while req != MPI.REQUEST_NULL and req.Test():
                moved = True
                clock, buffer, version, exposed, mark = (int(x) for x in self._bufs[i])
                if clock < 0:
                    self.ended[i] = True
                    self._reqs[i] = req = MPI.REQUEST_NULL
                    continue
                if exposed == WHOLE and version > self.version[i]:
                    self.clock[i], self.buffer[i], self.version[i] = clock, buffer, version
                    self.exposed[i], self.next_clock[i], self.mark[i] = 0, -1, mark
                elif exposed != WHOLE and version > self.version[i]:
                    self.next_clock[i], self.next_buffer[i] = clock, buffer
                    self.exposed[i], self.mark[i] = exposed, mark
                self._reqs[i] = req = self.comm.Irecv(self._bufs[i], source=self.servers[i], tag=Tag.NOTICE)
        return moved

    def readable(self, i: int, need: int) -> tuple[int, int]:
        """(buckets readable, buffer) of server ``i``'s first version with clock >= ``need``:
        ``WHOLE`` once published, the buckets exposed while it is applied, 0 before."""
        if self.clock[i] >= need:
            return WHOLE, self.buffer[i]
        if self.next_clock[i] >= need:
            return int(self.exposed[i]), self.next_buffer[i]
        return 0, 0

    def wait(self, need: int, what: Callable[[], str], timeout: float) -> None:
        """Until every server's clock is at least ``need``; StallError naming ``what()`` after
        ``timeout`` seconds without a notice."""
        self._until(lambda: int(self.clock.min()) >= need, what, timeout)

    def wait_started(self, need: int, what: Callable[[], str], timeout: float) -> None:
        """Until every server has exposed a bucket of a version with clock >= ``need``."""
        self._until(lambda: all(self.readable(i, need)[0] for i in range(len(self.servers))), what, timeout)

    def close(self, timeout: float) -> None:
        """After this worker's stop message: receive every notice up to each server's last."""
        self._until(lambda: all(self.ended), "every server's last notice", timeout)

    def _until(self, done: Callable[[], bool], what: str | Callable[[], str], timeout: float) -> None:
        def ready() -> bool:
            self.poll()
            return done()

        wait_for(ready, what, timeout, backoff=Backoff.for_messages())

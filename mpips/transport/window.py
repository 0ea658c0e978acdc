"""Parameter windows: a server's shard published through RMA, read by workers (see ``ParameterWindow``).

Server side: ``begin_update`` / ``prepare`` / ``expose`` / ``publish``; reader side (workers):
``newest`` / ``read_status`` / ``pull`` / ``pull_ranges``; both: the doorbell (``raise_flag`` /
``flag``). The byte layout of an exposed buffer is in ``mpips.transport.wire``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from mpi4py import MPI

from mpips.chunking import DEFAULT_CHUNK_BYTES
from mpips.transport.chunked import get_chunks
from mpips.transport.wire import HEADER_BYTES, PULL_CODECS, Slot, narrow, widen

__all__ = [
    "ParameterWindow",
]

log = logging.getLogger("mpips.transport")


class ParameterWindow:
    """A server's shard, published to workers through two RMA windows (a versioned double buffer).

    A server writes each new version (``params`` and its ``status`` block) into whichever of its
    two exposed buffers holds the older version, under an exclusive lock on that buffer alone
    (see "Server updates" below), then points its doorbell's ``NEWEST`` slot at it.
    Workers read that slot (one atomic read) and then the buffer under a shared lock, status block
    and shard in one epoch, so a pull always sees one whole version, and a server update never waits on the pulls
    of the current version: only on a pull still reading the version before it. (With a single
    locked buffer, workers pulling back to back starved the server's exclusive lock forever:
    measured with Open MPI 4.1 osc/rdma.)

    Each rank also exposes a small doorbell block that peers raise atomically (``raise_flag``)
    and the owner reads (``flag``). Workers expose nothing else. Creation and ``free()`` are
    collective over ``comm``.

    ``pull_codec`` (``--pull-codec``, the same on every rank): the exposed buffers hold the shard
    as float32, bf16 or fp16 elements; ``params`` stays float32, and ``pull`` widens.

    ``lead`` (asp/ssp ``--lookahead``): the exposed buffers hold the shard extrapolated along its
    last update, ``params + lead * (params - before)``, where ``before`` is ``params`` as the
    last ``begin_update()`` found them: workers compute their gradients where the parameters will
    be once ``lead`` more updates like it are applied. ``params`` (the optimizer's values, a
    private float32 master then) is what checkpoints and the final model take, and a third
    window exposes it where any rank has a lead (``pull_master``: an evaluation reads it without
    the server's help; the server holds it under an exclusive lock from ``begin_update()`` to
    ``publish()``, so a read sees one whole version).

    Server updates. With float32 pulls the server keeps no private copy: ``begin_update()`` takes
    the exclusive lock on the stale buffer, copies the current version's shard into it and makes
    ``params`` that buffer's shard, which the optimizer then updates in place; ``publish()``
    writes the status block, unlocks and points ``NEWEST`` there. Readers never wait for it: they
    read the buffer ``NEWEST`` names, which the update does not touch (a pull that read ``NEWEST``
    just before the previous publish and locks late waits for this update, then reads it whole).
    With bf16/fp16 pulls ``params`` is a private float32 master and ``publish()`` narrows it.

    Bucket by bucket (bsp, ``begin_update(lazy=True)``): the server holds a *shared* lock on the
    stale buffer, and ``prepare`` / ``expose`` each bucket in turn, so workers told by a notice
    (``NoticeSender.send_partial``) read finished buckets (``pull_ranges``) while the next ones
    are updated; ``publish()`` then writes the status block as before. Safe only where nobody
    can still be reading the stale buffer's older version, which bsp guarantees.
    """

    NEWEST = 0  # doorbell slot: the exposed buffer that holds the newest version (set by publish)
    BELL, MASTER = 2, 3  # the doorbell's window and the master's (with a lead), after the two buffers'

    def __init__(
        self, comm: MPI.Comm, shard_elements: int, init: np.ndarray | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES, pull_codec: str = "fp32", lead: float = 0.0,
    ):
        """``init``: the shard's initial values; a contiguous float32 vector becomes the working copy."""
        self.comm, self.chunk_bytes, self.pull_codec, self.lead = comm, chunk_bytes, pull_codec, lead
        self.itemsize = PULL_CODECS[pull_codec].itemsize
        self._staging: list[np.ndarray] = []  # worker, low-precision pulls: the bytes read per target
        n = shard_elements
        self.in_place = pull_codec == "fp32" and not lead  # the optimizer updates the stale exposed buffer itself
        self._updating: int | None = None  # the exposed buffer an update holds (in place)
        self._master_locked = False  # a led update holds the master's window exclusively
        self._lazy = False  # the update in progress is exposed range by range (begin_update(lazy=True))
        # the values, set before the windows exist so no pull can see uninitialised memory: with
        # bf16/fp16 pulls the float32 master is ``init`` itself where it is a float32 vector
        if init is not None and init.dtype == np.float32 and init.flags.c_contiguous and init.size == n:
            self._master = init
        else:
            self._master = np.zeros(n, dtype=np.float32)
            if init is not None:
                self._master[:] = init
        self.before = self._master.copy() if lead else None  # lead: the values before the last update
        self.status = np.zeros(HEADER_BYTES // 8, dtype=np.int64)  # server's working status
        nbytes = HEADER_BYTES + self.itemsize * n if n else 0
        # Win.Create over our own buffers: passive Get measured ~3x faster than Win.Allocate here.
        self._memory = [np.zeros(max(nbytes, HEADER_BYTES), dtype=np.uint8) for _ in range(2)]
        for i, mem in enumerate(self._memory):
            self._expose(mem[HEADER_BYTES:nbytes])
            mem[:HEADER_BYTES].view(np.int64)[Slot.VERSION] = -i  # buffer 0 is current
        if self.in_place:
            self._master = None  # the exposed buffers hold the values (init is the caller's to drop)
        self._bell_memory = np.zeros(HEADER_BYTES // 8, dtype=np.int64)
        self._wins: list[MPI.Win] | None = []
        self.rma = self._create(nbytes)

    def _create(self, nbytes: int) -> bool:
        """Create the windows; False (on every rank, none created) where the library cannot.

        Seen with Debian's Open MPI: no one-sided component for a TCP-only transport (a
        multi-node Ethernet cluster) or for one rank. Pulls then go by messages.
        """
        error = ""
        led = self.comm.allreduce(bool(self.lead), op=MPI.LOR)  # readers (lead 0) expose no master of their own
        try:
            for mem in self._memory:
                self._wins.append(MPI.Win.Create(mem[:nbytes] if nbytes else None, 1, comm=self.comm))
            self._wins.append(MPI.Win.Create(self._bell_memory, 8, comm=self.comm))
            if led:
                master = self._master if self.lead and self._master.size else None
                self._wins.append(MPI.Win.Create(master, 1, comm=self.comm))
        except MPI.Exception as exc:
            error = exc.Get_error_string()
        errors = self.comm.allgather(error)
        if not any(errors):
            return True
        for win in self._wins:
            win.Free()
        self._wins = []
        if self.comm.Get_rank() == 0:  # said once, whichever ranks failed
            failed = [e for e in errors if e]
            log.warning("no RMA windows on this MPI transport (%s, on %d of %d ranks): pulls go by messages",
                        failed[0], len(failed), len(errors))
        return False

    @property
    def exposes_master(self) -> bool:
        """Whether ``pull_master`` can read the servers' optimizer values (RMA, and a lead somewhere)."""
        return self.rma and len(self.wins) > self.MASTER

    @property
    def wins(self) -> list[MPI.Win]:
        if self._wins is None:
            raise RuntimeError("parameter window used after free()")
        if not self.rma:
            raise RuntimeError("this MPI transport has no RMA windows; use message pulls")
        return self._wins

    def _current(self) -> int:
        v = [int(m[:HEADER_BYTES].view(np.int64)[Slot.VERSION]) for m in self._memory]
        return 0 if v[0] >= v[1] else 1

    def _expose(self, out: np.ndarray) -> None:
        """The master values (led, ``lead``) into the bytes ``out`` of an exposed buffer, in the pull codec's type."""
        fp32 = self.pull_codec == "fp32"
        values = self._master
        if self.lead:  # in place where the exposed buffer is float32: no temporary of the shard's size
            values = out.view(np.float32) if fp32 else np.empty_like(self._master)
            # params + lead (params - before), in one pass: before + (1 + lead) (params - before)
            torch.lerp(torch.from_numpy(self.before), torch.from_numpy(self._master), 1.0 + self.lead,
                       out=torch.from_numpy(values))
        if not fp32:
            narrow(out, values, self.pull_codec)
        elif values is self._master:
            out.view(np.float32)[:] = values

    def _expose_range(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Master elements ``lo:hi`` into the exposed bytes ``out`` (the pull codec's type)."""
        narrow(out[self.itemsize * lo : self.itemsize * hi], self._master[lo:hi], self.pull_codec)

    def _shard(self, b: int) -> np.ndarray:
        return self._memory[b][HEADER_BYTES:].view(np.float32)

    @property
    def params(self) -> np.ndarray:
        """Server: float32 [shard elements]: in an update, the values being updated; else the
        current version's (read only: change them inside ``begin_update()`` / ``publish()``)."""
        if not self.in_place:
            return self._master
        if self._updating is not None:
            return self._shard(self._updating)
        current = self._shard(self._current())
        current.flags.writeable = False  # published: readers may be reading it
        return current

    def begin_update(self, lazy: bool = False) -> int | None:
        """Server, before changing ``params``: in place, lock the stale buffer exclusively and
        bring it to the current values; returns its index (None with a private master). With a
        ``lead``, ``before`` takes the values the update starts from.

        ``lazy`` (bsp, published bucket by bucket): take a *shared* lock on the stale buffer and
        copy nothing yet. The caller brings each range to the current values (``prepare``)
        before changing it and makes it readable (``expose``) once changed, every range before
        ``publish()``; workers may read the ranges exposed so far while later ones change. Only
        safe where no reader can still be reading the stale buffer's older version: in bsp every
        worker has pulled the current version before its push, and the update waits for every push.
        """
        if self._updating is not None:
            return self._updating if self.in_place else None
        if self.lead:
            if lazy:
                raise RuntimeError("a window with a lead publishes whole versions, not bucket by bucket")
            if self.exposes_master:  # readers of the master wait for this update's publish
                self.wins[self.MASTER].Lock(self.comm.Get_rank(), MPI.LOCK_EXCLUSIVE)
                self._master_locked = True
            self.before[:] = self._master
        if not self.in_place and not lazy:
            return None
        stale = 1 - self._current()
        if self.rma:
            self.wins[stale].Lock(self.comm.Get_rank(), MPI.LOCK_SHARED if lazy else MPI.LOCK_EXCLUSIVE)
        if self.in_place and not lazy:
            self._shard(stale)[:] = self._shard(1 - stale)
        self._updating, self._lazy = stale, lazy
        return stale if self.in_place else None

    @property
    def updating(self) -> int | None:
        """The exposed buffer an update in progress writes (0 or 1), or None."""
        return self._updating

    def next_version(self) -> int:
        """The version the next ``publish()`` makes."""
        return int(self._memory[self._current()][:HEADER_BYTES].view(np.int64)[Slot.VERSION]) + 1

    def prepare(self, lo: int, hi: int) -> None:
        """Lazy update: bring elements ``lo:hi`` of the buffer being updated to the current values."""
        if self.in_place and self._lazy:
            self._shard(self._updating)[lo:hi] = self._shard(1 - self._updating)[lo:hi]

    def expose(self, lo: int, hi: int) -> None:
        """Lazy update: elements ``lo:hi`` are final; make them readable (narrowed with a
        bf16/fp16 pull codec, then ``MPI_Win_sync``) before telling any worker."""
        if not self._lazy:
            raise RuntimeError("expose() belongs to an update begun with begin_update(lazy=True)")
        if not self.in_place:
            self._expose_range(self._memory[self._updating][HEADER_BYTES:], lo, hi)
        if self.rma:
            self.wins[self._updating].Sync()

    def published(self) -> np.ndarray:
        """Server: the bytes of the current version (status block + shard)."""
        return self._memory[self._current()]

    def publish(self) -> int:
        """Server: make ``params`` and ``status`` the next version, atomically for readers.

        Returns the index (0 or 1) of the exposed buffer that now holds it.
        """
        me, cur = self.comm.Get_rank(), self._current()
        stale = 1 - cur
        mem = self._memory[stale]
        self.status[Slot.VERSION] = self.next_version()
        if self._updating is None:  # a publish without new values: the current ones, as the next version
            if self.in_place:
                self.begin_update()
            elif self.rma:
                self.wins[stale].Lock(me, MPI.LOCK_EXCLUSIVE)
        try:
            if not self.in_place and not self._lazy:  # a lazy update exposed every range itself
                self._expose(mem[HEADER_BYTES:])
            mem[:HEADER_BYTES].view(np.int64)[:] = self.status
        finally:
            self._updating, self._lazy = None, False
            if self.rma:
                self.wins[stale].Unlock(me)
            if self._master_locked:
                self._master_locked = False
                self.wins[self.MASTER].Unlock(me)
        if self.rma:  # readers go there from now on
            self._bell_accumulate(me, self.NEWEST, stale, MPI.REPLACE)
        return stale

    def _lock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Lock(t, MPI.LOCK_SHARED)

    def _unlock_all(self, targets: list[int], which: list[int]) -> None:
        for t, b in zip(targets, which, strict=True):
            self.wins[b].Unlock(t)

    def newest(self, targets: list[int]) -> list[int]:
        """Worker: which exposed buffer of each target holds its newest version (its doorbell's
        ``NEWEST`` slot, read atomically in one shared epoch per target)."""
        return [self._bell_read(t, self.NEWEST) for t in targets]

    def read_status(self, targets: list[int], out: np.ndarray) -> list[int]:
        """Worker: the status block of each target's newest version into ``out[i]``; returns the
        buffer indices (``newest``). A server rewrites a buffer only with the version after the
        other buffer's, so the block read is of that version or a newer one, whole."""
        which = self.newest(targets)
        self._lock_all(targets, which)
        reqs = [r for i, (t, b) in enumerate(zip(targets, which, strict=True))
                for r in get_chunks(self.wins[b], out[i], t, 0, self.chunk_bytes)]
        MPI.Request.Waitall(reqs)
        self._unlock_all(targets, which)
        return which

    def pull(
        self, targets: list[int], status: np.ndarray, shards: list[np.ndarray], which: list[int] | None = None
    ) -> None:
        """Worker: status block and shard of the newest version of every target, whole.

        ``which``: the buffer indices a ``read_status`` just returned, to skip reading them again.
        That buffer is then at least as new as the status read: a server only rewrites a buffer
        with the version after the other buffer's, and whatever is read under the lock is whole.
        """
        if which is None:
            which = self.newest(targets)
        wide = self.pull_codec == "fp32"
        if not wide and not self._staging:
            self._staging = [np.empty(self.itemsize * s.size, dtype=np.uint8) for s in shards]
        self._lock_all(targets, which)
        reqs = []
        for i, (t, b) in enumerate(zip(targets, which, strict=True)):
            reqs += get_chunks(self.wins[b], status[i], t, 0, self.chunk_bytes)
            reqs += get_chunks(self.wins[b], shards[i] if wide else self._staging[i], t, HEADER_BYTES,
                               self.chunk_bytes)
        MPI.Request.Waitall(reqs)
        self._unlock_all(targets, which)
        if not wide:
            for shard, raw in zip(shards, self._staging, strict=True):
                widen(shard, raw, self.pull_codec)

    def pull_ranges(
        self, target: int, buffer: int, ranges: list[tuple[int, int]], shard: np.ndarray,
        status: np.ndarray | None = None,
    ) -> None:
        """Worker: elements ``lo:hi`` of each range of ``target``'s exposed buffer ``buffer`` into
        ``shard[lo:hi]`` (widened from the pull codec), and its status block into ``status``
        if given, in one shared-lock epoch (``mpips.client.pullahead``: the buckets a notice says are
        exposed)."""
        size, wide = self.itemsize, self.pull_codec == "fp32"
        win = self.wins[buffer]
        raw = [shard[lo:hi] if wide else np.empty(size * (hi - lo), dtype=np.uint8) for lo, hi in ranges]
        win.Lock(target, MPI.LOCK_SHARED)
        reqs = get_chunks(win, status, target, 0, self.chunk_bytes) if status is not None else []
        for (lo, _), out in zip(ranges, raw, strict=True):
            reqs += get_chunks(win, out, target, HEADER_BYTES + size * lo, self.chunk_bytes)
        MPI.Request.Waitall(reqs)
        win.Unlock(target)
        if not wide:
            for (lo, hi), out in zip(ranges, raw, strict=True):
                widen(shard[lo:hi], out, self.pull_codec)

    def pull_master(self, targets: list[int], shards: list[np.ndarray]) -> None:
        """Worker: each target's optimizer values (its float32 master, with a lead: ``exposes_master``)
        into ``shards[i]``, whole: read under a shared lock, which waits for an update in progress."""
        win = self.wins[self.MASTER]
        for t in targets:
            win.Lock(t, MPI.LOCK_SHARED)
        MPI.Request.Waitall([r for t, shard in zip(targets, shards, strict=True)
                             for r in get_chunks(win, shard, t, 0, self.chunk_bytes)])
        for t in targets:
            win.Unlock(t)

    def raise_flag(self, target: int, slot: int, value: int) -> None:
        """Atomically raise doorbell ``slot`` of ``target`` to at least ``value`` (MPI_MAX).

        Without RMA windows there is no doorbell: a no-op (Slurm signals every rank anyway).
        """
        if self.rma:
            self._bell_accumulate(target, slot, value, MPI.MAX)

    def flag(self, slot: int) -> int:
        """This rank's doorbell ``slot``, read atomically (0 without RMA windows)."""
        return self._bell_read(self.comm.Get_rank(), slot) if self.rma else 0

    def _bell_accumulate(self, target: int, slot: int, value: int, op: MPI.Op) -> None:
        """``op`` (MAX, REPLACE) ``value`` into doorbell ``slot`` of ``target``, atomically."""
        win = self.wins[self.BELL]
        win.Lock(target, MPI.LOCK_SHARED)
        # origin and target must name the same datatype: numpy's int64 maps to MPI_LONG (ERR_ARG)
        win.Accumulate([np.array([value], dtype=np.int64), MPI.INT64_T], target, (slot, 1, MPI.INT64_T), op=op)
        win.Unlock(target)

    def _bell_read(self, target: int, slot: int) -> int:
        """Doorbell ``slot`` of ``target``, read atomically in one shared epoch."""
        win, out = self.wins[self.BELL], np.zeros(1, dtype=np.int64)
        win.Lock(target, MPI.LOCK_SHARED)
        win.Get_accumulate(np.zeros(1, dtype=np.int64), out, target, (slot, 1, MPI.INT64_T), op=MPI.NO_OP)
        win.Unlock(target)
        return int(out[0])

    def free(self) -> None:
        """Collective; idempotent."""
        if self._wins is not None:
            for win in self._wins:
                win.Free()
            self._wins = None

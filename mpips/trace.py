"""Timeline of a job: every rank's spans in one Chrome trace, clocks aligned across ranks.

``--trace FILE.json`` makes every rank record what it spends its time on (a worker waiting for
parameters, pulling, computing, pushing, waiting for data; a server receiving, applying,
publishing, waiting for pushes; a data server reading and serving; everyone writing
checkpoints) and, at the end of the run, rank 0 writes one file in the Chrome trace event format,
which Perfetto (https://ui.perfetto.dev) and chrome://tracing open::

    mpirun -n 4 python -m mpips.train --trace trace.json --metrics metrics.jsonl
    python -m mpips.report metrics.jsonl --trace trace.json --out report/

The file is ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``: one process
(``pid``) per rank, named ``"<role> <index> (rank <r>)"`` by ``"M"`` metadata events, and one
``"X"`` (complete) event per span, with ``ts`` and ``dur`` in microseconds since rank 0's clock at
start-up. ``otherData`` holds ``epoch_at_zero`` (the Unix time of ``ts`` 0, to line the trace up
with the metrics file), each rank's measured clock offset and its uncertainty, and how many spans
a rank dropped past its bound.

**Clocks.** Each rank reads ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: shared by the
processes of one host, independent across hosts). At start-up rank 0 measures every other rank's
offset NTP-style: rank r sends its time t1, rank 0 answers with its time T, rank r notes t2 on
receipt; with symmetric delays ``offset = T - (t1 + t2) / 2``, exact to within half the round
trip. Of ``ROUNDS`` such exchanges the one with the shortest round trip is kept (the least queued,
so the tightest bound), and its half round trip is the stated uncertainty. Every span of rank r is
then written as ``local + offset``: rank 0's clock. Drift over a run (crystal clocks: tens of
ppm, i.e. well under a millisecond over a minute) is not corrected.

**Cost.** A span is two clock reads and three appends to ``array`` buffers (no dicts, no
objects kept per span); spans per rank are bounded by ``max_spans`` (the rest are counted, not
kept). With tracing off the roles hold ``NULL_TRACER``, whose ``span`` returns one shared no-op
context manager. The README states the measured overhead.
"""

from __future__ import annotations

import json
import math
import os
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "NULL_TRACER",
    "ROUNDS",
    "NullTracer",
    "RankTrace",
    "Tracer",
    "chrome_trace",
    "estimate_offset",
    "measure_offsets",
]

ROUNDS = 8  # ping-pongs per rank at start-up; the shortest round trip is kept
MAX_SPANS = 1_000_000  # per rank: 28 MB of buffers (the default job records ~3,500); later spans are counted
IDLE_GAP = 1e-3  # seconds: idle spans closer than this to the previous idle span are merged


class _Null:
    """A context manager that does nothing (``NullTracer.span``)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


class NullTracer:
    """Tracing off: every call is a no-op, ``span`` returns one shared context manager."""

    enabled = False

    def span(self, name: str, step: int = -1) -> _Null:
        return _NULL

    def now(self) -> float:
        return 0.0

    def record(self, name: str, start: float, end: float | None = None, step: int = -1) -> None:
        return None

    def idle(self, name: str, start: float) -> None:
        return None


NULL_TRACER = NullTracer()


class _Span:
    __slots__ = ("tracer", "name", "step", "start")

    def __init__(self, tracer: Tracer, name: str, step: int):
        self.tracer, self.name, self.step = tracer, name, step

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.tracer.record(self.name, self.start, time.perf_counter(), self.step)


@dataclass
class RankTrace:
    """One rank's spans, as gathered to rank 0: times in seconds on rank 0's clock."""

    rank: int
    role: str
    index: int
    names: list[str]
    name_ids: np.ndarray  # int32 [spans]: index into names
    start: np.ndarray  # float64 [spans], seconds
    end: np.ndarray  # float64 [spans], seconds
    step: np.ndarray  # int64 [spans]: the training step, -1 where none
    offset: float = 0.0  # seconds added to this rank's clock
    uncertainty: float = 0.0  # seconds: half the round trip of the kept measurement
    dropped: int = 0  # spans past max_spans, not kept
    extra: dict[str, Any] = field(default_factory=dict)


class Tracer:
    """Records spans of one rank: ``with tracer.span("push"): ...``.

    Args:
        rank: this rank in the world.
        role: "worker", "server" or "data server".
        index: the rank's index within its role.
        offset: seconds to add to this rank's ``time.perf_counter()`` to get rank 0's
            (``measure_offsets``).
        uncertainty: the offset's error bound in seconds.
        max_spans: spans kept; later ones are counted in ``dropped``.
    """

    enabled = True

    def __init__(self, rank: int, role: str, index: int, offset: float = 0.0, uncertainty: float = 0.0,
                 max_spans: int = MAX_SPANS):
        self.rank, self.role, self.index = rank, role, index
        self.offset, self.uncertainty, self.max_spans = offset, uncertainty, max_spans
        self._ids: dict[str, int] = {}
        self._name = array("i")
        self._start = array("d")
        self._end = array("d")
        self._step = array("q")
        self.dropped = 0
        # ts 0 of the trace: rank 0's clock now (rank 0 writes the file), and the Unix time of it
        self.zero = (time.perf_counter() + offset, time.time())

    @classmethod
    def start(cls, comm: Any, role: str, index: int, enabled: bool = True) -> Tracer | NullTracer:
        """Collective over ``comm`` when ``enabled``: measure clock offsets, return this rank's tracer."""
        if not enabled:
            return NULL_TRACER
        zero = (time.perf_counter(), time.time())  # rank 0: before any rank can record a span
        offset, uncertainty = measure_offsets(comm)
        tracer = cls(comm.Get_rank(), role, index, offset, uncertainty)
        tracer.zero = zero
        return tracer

    def now(self) -> float:
        """This rank's clock, in the units ``record`` takes."""
        return time.perf_counter()

    def span(self, name: str, step: int = -1) -> _Span:
        """A context manager recording the time spent in its block as span ``name``."""
        return _Span(self, name, step)

    def record(self, name: str, start: float, end: float | None = None, step: int = -1) -> None:
        """Record span ``name`` from ``start`` to ``end`` (default: now), times from ``now()``."""
        if len(self._start) >= self.max_spans:
            self.dropped += 1
            return
        i = self._ids.get(name)
        if i is None:
            i = self._ids[name] = len(self._ids)
        self._name.append(i)
        self._start.append(start)
        self._end.append(time.perf_counter() if end is None else end)
        self._step.append(step)

    def idle(self, name: str, start: float) -> None:
        """Record ``name`` from ``start`` to now, merged into the previous span when that one is the
        same idle span and ended less than ``IDLE_GAP`` before ``start`` (a polling loop's empty
        rounds make one span, not thousands)."""
        now = time.perf_counter()
        i = self._ids.get(name)
        if i is not None and self._name and self._name[-1] == i and start - self._end[-1] < IDLE_GAP:
            self._end[-1] = now
            return
        self.record(name, start, now)

    def __len__(self) -> int:
        return len(self._start)

    def collect(self) -> RankTrace:
        """This rank's spans on rank 0's clock."""
        names = sorted(self._ids, key=self._ids.__getitem__)
        return RankTrace(
            rank=self.rank, role=self.role, index=self.index, names=names,
            name_ids=np.frombuffer(self._name, dtype=np.int32).copy(),
            start=np.frombuffer(self._start, dtype=np.float64) + self.offset,
            end=np.frombuffer(self._end, dtype=np.float64) + self.offset,
            step=np.frombuffer(self._step, dtype=np.int64).copy(),
            offset=self.offset, uncertainty=self.uncertainty, dropped=self.dropped,
        )

    def write(self, comm: Any, path: str | os.PathLike[str]) -> None:
        """Collective over ``comm``: rank 0 writes every rank's spans to ``path``.

        Rank 0 takes one rank's spans at a time and writes them out before the next, so it holds
        one rank's spans beyond its own, never the whole job's.
        """
        mine = self.collect()
        dup = comm.Dup()
        try:
            earliest = dup.gather(float(mine.start.min()) if len(mine.start) else math.inf, root=0)
            if dup.Get_rank() != 0:
                dup.send(mine, dest=0, tag=4)
                return
            origin, epoch = _origin(self.zero, min(earliest))
            tmp = f"{os.fspath(path)}.tmp"
            ranks = {}
            with open(tmp, "w") as f:
                f.write('{"displayTimeUnit":"ms","traceEvents":[\n')
                first = True
                for r in range(dup.Get_size()):
                    rt = mine if r == 0 else dup.recv(source=r, tag=4)
                    for event in _events(rt, origin):
                        f.write(("" if first else ",\n") + json.dumps(event, separators=(",", ":")))
                        first = False
                    ranks[str(rt.rank)] = _rank_data(rt)
                    del rt
                f.write('\n],"otherData":' + json.dumps(_other(epoch, ranks)) + "}\n")
            os.replace(tmp, path)
        finally:
            dup.Free()


def estimate_offset(samples: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """(offset, uncertainty) from ping-pongs ``(t1, T, t2)``: local send, reference reply, local receipt.

    The exchange with the shortest round trip ``t2 - t1`` wins; with symmetric delays the reference
    clock read ``T`` at the local ``(t1 + t2) / 2``, so ``offset = T - (t1 + t2) / 2``, wrong by at
    most half the round trip (the uncertainty).
    """
    if not samples:
        raise ValueError("no clock samples")
    t1, ref, t2 = min(samples, key=lambda s: s[2] - s[0])
    return ref - (t1 + t2) / 2, (t2 - t1) / 2


def measure_offsets(comm: Any, rounds: int = ROUNDS) -> tuple[float, float]:
    """Collective: this rank's clock offset to rank 0 and its uncertainty, in seconds (0, 0 on rank 0).

    Rank 0 serves the other ranks one at a time (a "go" message first, so no ping waits in a queue
    while it serves another rank), ``rounds`` ping-pongs each, on a duplicate of ``comm`` so no
    message of the job can match.
    """
    dup = comm.Dup()
    try:
        rank, size = dup.Get_rank(), dup.Get_size()
        buf = np.zeros(1, dtype=np.float64)
        if rank == 0:
            for r in range(1, size):
                dup.Send(buf, dest=r, tag=1)
                for _ in range(rounds):
                    dup.Recv(buf, source=r, tag=2)
                    buf[0] = time.perf_counter()
                    dup.Send(buf, dest=r, tag=3)
            return 0.0, 0.0
        dup.Recv(buf, source=0, tag=1)
        samples = []
        for _ in range(rounds):
            t1 = time.perf_counter()
            dup.Send(buf, dest=0, tag=2)
            dup.Recv(buf, source=0, tag=3)
            samples.append((t1, float(buf[0]), time.perf_counter()))
        return estimate_offset(samples)
    finally:
        dup.Free()


def _origin(zero: tuple[float, float], earliest: float) -> tuple[float, float]:
    """ts 0 and its Unix time: rank 0's ``zero``, or the earliest span if one starts before it."""
    origin, epoch = zero
    if earliest < origin:
        return earliest, epoch - (origin - earliest)
    return origin, epoch


def _events(rt: RankTrace, origin: float) -> Iterator[dict[str, Any]]:
    """The metadata and complete events of one rank, ``ts`` in microseconds from ``origin``."""
    label = f"{rt.role} {rt.index} (rank {rt.rank})"
    yield {"ph": "M", "name": "process_name", "pid": rt.rank, "tid": 0, "args": {"name": label}}
    yield {"ph": "M", "name": "process_sort_index", "pid": rt.rank, "tid": 0, "args": {"sort_index": rt.rank}}
    yield {"ph": "M", "name": "thread_name", "pid": rt.rank, "tid": 0, "args": {"name": rt.role}}
    ts = np.round((rt.start - origin) * 1e6, 1).tolist()
    dur = np.round((rt.end - rt.start) * 1e6, 1).tolist()
    for i, t, d, s in zip(rt.name_ids.tolist(), ts, dur, rt.step.tolist(), strict=True):
        event = {"ph": "X", "name": rt.names[i], "cat": rt.role, "pid": rt.rank, "tid": 0, "ts": t, "dur": d}
        if s >= 0:
            event["args"] = {"step": s}
        yield event


def _rank_data(rt: RankTrace) -> dict[str, Any]:
    return {"role": rt.role, "index": rt.index, "clock_offset_us": rt.offset * 1e6,
            "clock_uncertainty_us": rt.uncertainty * 1e6, "dropped_spans": rt.dropped}


def _other(epoch: float, ranks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"producer": "mpips", "epoch_at_zero": epoch, "ranks": ranks}


def chrome_trace(ranks: Sequence[RankTrace], zero: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The Chrome trace event document of ``ranks``, as ``Tracer.write`` writes it.

    ``zero``: rank 0's clock and the Unix time at that instant; ts 0 is there, or at the earliest
    span if one starts before it, so that no ``ts`` is negative.
    """
    earliest = min((float(rt.start.min()) for rt in ranks if len(rt.start)), default=math.inf)
    origin, epoch = _origin(zero, earliest)
    ordered = sorted(ranks, key=lambda r: r.rank)
    return {
        "displayTimeUnit": "ms",
        "traceEvents": [e for rt in ordered for e in _events(rt, origin)],
        "otherData": _other(epoch, {str(rt.rank): _rank_data(rt) for rt in ordered}),
    }

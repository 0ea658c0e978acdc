"""What every benchmark shares: repeated timing with warm-up, median and spread, machine facts,
quiet waits for ranks that sit out a measurement, and the printed table.

Pure helpers except ``quiet_barrier`` and ``machine_facts``, which take a communicator.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "BenchError",
    "Spread",
    "default_threads",
    "format_table",
    "load_average",
    "machine_facts",
    "parse_names",
    "parse_sizes",
    "quiet_barrier",
    "run_quietly",
    "ratio",
    "time_repeated",
]


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (too few ranks, bad sizes); the message says why."""


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements (warm-up already excluded)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    reps: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        v = sorted(float(x) for x in values)
        if len(v) == 1:
            q1 = q3 = v[0]
        else:
            q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(statistics.median(v), q1, q3, v[0], v[-1], len(v))

    def scaled(self, f: Callable[[float], float]) -> Spread:
        """The spread of ``f(x)`` for a monotonic ``f`` (decreasing ones swap the ends)."""
        lo, hi = sorted((f(self.min), f(self.max)))
        q1, q3 = sorted((f(self.q1), f(self.q3)))
        return Spread(f(self.median), q1, q3, lo, hi, self.reps)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def rel_iqr(self) -> float:
        """Half the interquartile range relative to the median (for the printed ``±``)."""
        return (self.q3 - self.q1) / 2 / self.median if self.median else 0.0


def time_repeated(op: Callable[[], Any], reps: int, warmup: int,
                  before: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``op()`` for ``reps`` timed calls after ``warmup`` untimed ones.

    ``before()`` runs ahead of every call, outside the timing (e.g. a barrier).
    """
    times = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        op()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or not b:
        return None
    return a / b


def run_quietly(cfg: Any, comm: Any, metrics: str | None = None) -> None:
    """``mpips.train.run(cfg, comm)`` without its lines (stdout, mpips' INFO log): a benchmark
    prints its own rows. ``metrics``: the run's metrics file, removed first (rank 0) so that it
    holds this run's events only. Collective over ``comm``."""
    from mpips.train import run

    if metrics is not None:
        if comm.Get_rank() == 0 and os.path.exists(metrics):
            os.remove(metrics)
        comm.Barrier()
    logging.getLogger("mpips").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg, comm)


def parse_names(text: str, flag: str, allowed) -> list[str]:  # noqa: ANN001 (any container of names)
    """'mlp, gpt' -> ['mlp', 'gpt']; BenchError naming ``flag`` for a name not in ``allowed``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            raise BenchError(f"{flag}: unknown {n!r}; choose from {', '.join(allowed)}")
    return names


def parse_sizes(text: str) -> list[int]:
    """'1M,10M,1G' or '1,10,100' (MB) -> bytes. Suffixes K, M, G are powers of 1000."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    out = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("B")
        if not part:
            continue
        mult = units.get(part[-1])
        number = part[:-1] if mult else part
        try:
            value = float(number) * (mult or 10**6)
        except ValueError:
            raise BenchError(f"cannot read size {part!r}: use e.g. 1M, 100M, 1G") from None
        if value < 4:
            raise BenchError(f"size {part!r} is below one float32")
        out.append(int(value) // 4 * 4)
    if not out:
        raise BenchError("no sizes given")
    return out


def quiet_barrier(comm, timeout: float = 600.0) -> None:
    """A barrier that sleeps between polls, so ranks sitting out a measurement leave the cores
    to the ranks being measured (a blocking MPI barrier spins, even with yield_when_idle)."""
    from mpips.transport import wait_for

    req = comm.Ibarrier()
    wait_for(req.Test, "the other ranks at a benchmark barrier", timeout)


def default_threads(comm) -> int:
    """torch threads per rank: this host's cores divided by the ranks on it, at least 1."""
    host = socket.gethostname()
    on_host = comm.allgather(host).count(host)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // on_host)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def machine_facts(comm) -> dict[str, Any]:
    """Where and how the benchmark ran: cores, memory, MPI library, versions, threads, ranks."""
    import mpi4py
    import torch
    from mpi4py import MPI

    hosts = comm.allgather(socket.gethostname())
    ompi = {k: v for k, v in os.environ.items() if k.startswith(("OMPI_MCA_", "MPIR_CVAR_"))}
    return {
        "hosts": sorted(set(hosts)),
        "ranks": comm.Get_size(),
        "ranks_per_host": {h: hosts.count(h) for h in sorted(set(hosts))},
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": _cpu_model(),
        "memory_gb": _memory_gb(),
        "mpi_library": MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0],
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "mpi_env": ompi,
        "mpi4py": mpi4py.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: above the core count, other work shared the cores."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A right-aligned text table; floats get 3 significant digits, None prints as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)

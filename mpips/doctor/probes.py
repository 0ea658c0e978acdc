"""Probes of the MPI library: which libmpi is loaded, whether it is CUDA-aware, and whether a
passive-target ``MPI_Get`` completes while its target computes without calling MPI."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpips.doctor.launcher import _first_line, run_bounded

__all__ = [
    "cuda_probe",
    "ProbeResult",
    "cuda_aware",
    "find_loaded_libmpi",
    "rma_passive_progress",
]


# Shared objects that are "the MPI library" across vendors: Open MPI and Intel MPI (libmpi),
# MPICH/MVAPICH (libmpich or libmpi), Cray (libmpi_cray), IBM Spectrum (libmpi_ibm). Not the
# language bindings next to them (libmpi_cxx, libmpi_mpifh, libmpi_usempif08).
_LIBMPI_NAME = re.compile(r"/lib(?:mpi|mpich|mpi_cray|mpi_ibm)\.so(?:\.\d+)*$")
# Marks rank 0 writes into the probe window around its MPI-free computation.
_IDLE, _BUSY, _DONE = 0, 1, 2


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`rma_passive_progress`, the same on every rank.

    Attributes:
        passive: True if a Get completed while its target computed without calling MPI, False
            if it completed only once the target called MPI again, None if not tested.
        latency_s: duration of the Lock/Get/Unlock that decided it; None if not tested.
        busy_s: how long the target computed without calling MPI.
        nbytes: bytes read by each Get.
        detail: why it was not tested, or the error that stopped it; empty otherwise.
    """

    passive: bool | None
    latency_s: float | None = None
    busy_s: float = 0.0
    nbytes: int = 0
    detail: str = ""

    def describe(self) -> str:
        """One line for the report."""
        if self.passive is None:
            return f"not tested: {self.detail}"
        size = f"{self.nbytes / 2**20:g} MiB" if self.nbytes >= 2**20 else f"{self.nbytes} B"
        if self.passive:
            return (f"yes: a {size} Get took {self.latency_s * 1e3:.2f} ms while its target "
                    f"computed for {self.busy_s:g} s without calling MPI")
        return (f"no: a {size} Get waited {self.latency_s:.2f} s, until its target called MPI "
                f"again after {self.busy_s:g} s of computing")


def find_loaded_libmpi(maps_text: str) -> str | None:
    """The path of the MPI library mapped into a process.

    Args:
        maps_text: the text of ``/proc/<pid>/maps``.

    Returns:
        The first mapped file named like an MPI library (``libmpi.so.40``, ``libmpich.so.12``,
        ``libmpi_cray.so.12``, ...), or None if there is none.
    """
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _LIBMPI_NAME.search(fields[5].strip()):
            return fields[5].strip()
    return None


def cuda_aware(libmpi: str | None = None) -> bool | None:
    """Whether the MPI library accepts CUDA device pointers, from ``MPIX_Query_cuda_support()``.

    mpi4py has no wrapper for it and the symbol is not global (``ctypes.CDLL(None)`` misses it),
    so the library is opened by path.

    Args:
        libmpi: path of the MPI library; default: the one this process has loaded, which means
            mpi4py's ``MPI`` module must have been imported first.

    Returns:
        True or False as the library answers; None when there is no library or no such symbol.
    """
    if libmpi is None:
        libmpi = find_loaded_libmpi(Path("/proc/self/maps").read_text())
    if libmpi is None:
        return None
    try:
        query = getattr(ctypes.CDLL(libmpi), "MPIX_Query_cuda_support", None)
    except OSError:
        return None
    if query is None:
        return None
    query.restype, query.argtypes = ctypes.c_int, []
    return bool(query())


def rma_passive_progress(comm: Any, busy_s: float = 1.0, nbytes: int = 1 << 20) -> ProbeResult:
    """Does a passive-target Get complete while the target computes without calling MPI?

    Collective over ``comm``. Rank 0 exposes ``nbytes`` through ``MPI.Win.Create`` over a numpy
    buffer (as parameter servers do), writes a "busy" mark into it, computes in pure Python for
    ``busy_s`` seconds, writes "done", and only then calls MPI again. Rank 1 reads the buffer
    with ``Lock(SHARED)`` / ``Get`` / ``Unlock`` until it sees a mark. Reading "busy" proves that
    the Get completed without the target's help; reading "done" means the library waited for the
    target to enter MPI (MPICH without an async progress thread, Open MPI's osc/pt2pt). Other
    ranks wait in a barrier.

    Args:
        comm: an ``mpi4py.MPI.Comm``; a size below 2 returns an untested result.
        busy_s: how long rank 0 computes.
        nbytes: bytes exposed and read by each Get (a multiple of 8).

    Returns:
        The result decided on rank 1, broadcast to every rank.
    """
    if comm.Get_size() < 2:
        return ProbeResult(None, busy_s=busy_s, nbytes=nbytes, detail="needs 2 ranks")
    import numpy as np
    from mpi4py import MPI

    buf = np.zeros(nbytes // 8, dtype=np.int64)
    try:
        win = MPI.Win.Create(buf if comm.Get_rank() == 0 else None, comm=comm)
    except MPI.Exception as exc:
        return ProbeResult(None, busy_s=busy_s, nbytes=nbytes,
                           detail=f"MPI.Win.Create failed: {exc.Get_error_string()}")
    result = None
    try:
        comm.Barrier()
        if comm.Get_rank() == 0:
            buf[0] = _BUSY
            _compute_without_mpi(busy_s)
            buf[0] = _DONE
        elif comm.Get_rank() == 1:
            result = _read_until_marked(win, buf, busy_s)
        comm.Barrier()
        return comm.bcast(result, root=1)
    finally:
        win.Free()


def _compute_without_mpi(seconds: float) -> None:
    """Keep this rank busy in the interpreter, never entering the MPI library."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


def _read_until_marked(win: Any, out: Any, busy_s: float) -> ProbeResult:
    """Get rank 0's buffer until it carries a mark; the first marked read decides."""
    from mpi4py import MPI

    while True:
        start = time.perf_counter()
        win.Lock(0, MPI.LOCK_SHARED)
        win.Get(out, 0)
        win.Unlock(0)
        latency = time.perf_counter() - start
        if out[0] != _IDLE:
            return ProbeResult(bool(out[0] == _BUSY), latency, busy_s, out.nbytes)
        time.sleep(0.005)  # rank 0 has not started computing yet


def _probe_with_mpirun(mpirun: str | None, version: str, busy_s: float) -> ProbeResult:
    """Run the RMA probe under ``mpirun -n 2`` from a process that is alone in its world.

    Args:
        mpirun: path of mpirun, or None if there is none.
        version: the first line of its ``--version``.
        busy_s: how long the probe's target computes.
    """
    if mpirun is None:
        return ProbeResult(None, busy_s=busy_s, detail="no mpirun on PATH (run under mpirun -n 2)")
    env = dict(os.environ)
    if "Open MPI" in version:
        env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # Open MPI 4
        env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")  # Open MPI 5
        if os.geteuid() == 0:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = [mpirun, "-n", "2", sys.executable, "-m", "mpips.doctor", "--rma-probe",
           "--busy", str(busy_s)]
    try:
        proc = run_bounded(cmd, env, timeout=60 + 4 * busy_s)
    except subprocess.TimeoutExpired as exc:
        return ProbeResult(None, busy_s=busy_s,
                           detail=f"`mpirun -n 2` timed out after {exc.timeout:g} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return ProbeResult(**json.loads(lines[-1]))
    why = _first_line(proc.stderr) or f"exit status {proc.returncode}"
    return ProbeResult(None, busy_s=busy_s, detail=f"`mpirun -n 2` failed: {why}")


def cuda_probe(comm: Any, aware: bool | None, force: bool = False, nbytes: int = 1 << 20) -> str:
    """Send/Recv of a device buffer between ranks 0 and 1: does the MPI take GPU memory?

    ChainerMN's ``_check_cuda_aware_mpi`` does the same: rank 0 sends ``nbytes`` of a CUDA tensor
    (float32 0, 1, 2, ...) to rank 1, which receives into a CUDA tensor and compares. Each rank
    uses GPU ``local rank % GPUs``. An MPI that is not CUDA-aware may crash on a device pointer
    instead of failing, so the probe runs only where the library said yes, or with ``force``.
    Collective over ``comm``.

    Returns:
        One line, the same on every rank: ``"passed: ..."``, ``"FAILED: ..."`` or ``"not run: ..."``.
    """
    try:
        import torch
    except ImportError:
        return "not run: torch cannot be imported"
    gpus = comm.allgather(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if comm.Get_size() < 2:
        return "not run: needs 2 ranks (mpirun -n 2 python -m mpips.doctor)"
    if not gpus[0] or not gpus[1]:
        return "not run: no GPU visible to torch on rank 0 or rank 1 (torch.cuda.is_available() is False)"
    if not aware and not force:
        return ("not run: the MPI library did not say it is CUDA-aware, and a device pointer can crash it"
                " (--cuda-probe runs it anyway); mpips stages through pinned host memory")
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_rank()
    node.Free()
    result = None
    rank = comm.Get_rank()
    if rank in (0, 1):
        device = torch.device("cuda", local % gpus[rank])
        n = nbytes // 4
        try:
            if rank == 0:
                buf = torch.arange(n, dtype=torch.float32, device=device)
                torch.cuda.synchronize(device)
                comm.Send([buf, MPI.FLOAT], dest=1, tag=77)
            else:
                buf = torch.zeros(n, dtype=torch.float32, device=device)
                comm.Recv([buf, MPI.FLOAT], source=0, tag=77)
                torch.cuda.synchronize(device)
                ok = bool(torch.equal(buf, torch.arange(n, dtype=torch.float32, device=device)))
                result = (f"passed: {nbytes / 2**20:g} MiB sent from GPU memory on rank 0 arrived intact in"
                          " GPU memory on rank 1" if ok else
                          f"FAILED: {nbytes / 2**20:g} MiB sent from GPU memory arrived wrong on rank 1")
        except Exception as exc:  # noqa: BLE001 - any failure is the probe's answer
            result = f"FAILED on rank {rank}: {type(exc).__name__}: {exc}"
    results = comm.allgather(result)
    return next((r for r in results if r and r.startswith("FAILED")), results[1])

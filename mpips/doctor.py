"""Environment self-test: can this machine (or allocation) run an mpips job?

    python -m mpips.doctor                  # one process; probes RMA with its own `mpirun -n 2`
    mpirun -n 4 python -m mpips.doctor      # the job's own launch line: probes these ranks
    srun -n 8 python -m mpips.doctor        # same, on a Slurm allocation

Rank 0 prints one line per check: the MPI library and standard, the thread level, the ranks
and hosts, whether a passive-target ``MPI_Get`` completes while its target computes without
calling MPI (what parameter pulls rely on), whether MPI is CUDA-aware, h5py's MPI-IO, torch,
numpy and thread settings, then advice for anything that will be slow or will not work.
The exit status is 1 when something every job needs is missing (mpi4py, h5py, torch), 0
otherwise, and the same on every rank.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mpips.cuda_aware import library_lookup
from mpips.cuda_aware import query as query_cuda

__all__ = [
    "Finding",
    "cuda_probe",
    "ProbeResult",
    "cuda_aware",
    "end_session",
    "find_loaded_libmpi",
    "LauncherClaim",
    "launcher_claim",
    "launcher_world_size",
    "matching_launcher",
    "main",
    "rma_passive_progress",
    "run_bounded",
]

OK, WARN, FAIL = "ok", "warn", "fail"
SETUP_ADVICE = "run `bash jobs/setup.sh` (or `pip install -e .` in an environment that has it)"

# Shared objects that are "the MPI library" across vendors: Open MPI and Intel MPI (libmpi),
# MPICH/MVAPICH (libmpich or libmpi), Cray (libmpi_cray), IBM Spectrum (libmpi_ibm). Not the
# language bindings next to them (libmpi_cxx, libmpi_mpifh, libmpi_usempif08).
_LIBMPI_NAME = re.compile(r"/lib(?:mpi|mpich|mpi_cray|mpi_ibm)\.so(?:\.\d+)*$")

# Debian and Ubuntu install each MPI's launcher under its own name as well; `mpirun` is whichever
# update-alternatives picked, not necessarily the MPI that mpi4py was built for.
_OWN_MPIRUN = {"MPICH": "mpirun.mpich", "Open MPI": "mpirun.openmpi"}

# Marks rank 0 writes into the probe window around its MPI-free computation.
_IDLE, _BUSY, _DONE = 0, 1, 2


@dataclass(frozen=True)
class Finding:
    """One line of the report.

    Attributes:
        label: what was checked, e.g. ``"h5py"``.
        value: what was found, one line.
        status: ``"ok"``, ``"warn"`` (works, but slowly or not everywhere) or ``"fail"`` (a job
            cannot run).
        advice: what to do about a warn or fail, one sentence each.
    """

    label: str
    value: str
    status: str = OK
    advice: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class LauncherClaim:
    """What a launcher's environment variables say about this process.

    Attributes:
        launcher: who set them, in words ("Open MPI's mpirun", "srun", ...).
        size_var: the variable that gave the size, e.g. ``OMPI_COMM_WORLD_SIZE``.
        size: how many processes the launcher started.
        rank: this process's number among them, or None where the launcher set none.
    """

    launcher: str
    size_var: str
    size: int
    rank: int | None


# (size variable, rank variable, launcher), most specific first: mpirun under Slurm starts its
# daemons with srun, so its ranks carry srun's variables too, with srun's (smaller) counts.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI's mpirun"),
    ("PMI_SIZE", "PMI_RANK", "a PMI launcher (MPICH's or Intel MPI's mpiexec, srun --mpi=pmi2)"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"),
)


def launcher_claim(environ: Mapping[str, str]) -> LauncherClaim | None:
    """How many processes the launcher says it started, and which one this is.

    Args:
        environ: the process environment.

    Returns:
        From ``OMPI_COMM_WORLD_SIZE``/``_RANK`` (Open MPI), ``PMI_SIZE``/``PMI_RANK`` (MPICH, Intel
        MPI, srun with PMI2) or ``SLURM_STEP_NUM_TASKS``/``SLURM_PROCID`` (srun), the first set;
        None when no launcher set any.
    """
    for size_var, rank_var, launcher in _LAUNCHER_VARS:
        size = environ.get(size_var, "")
        if size.isdigit():
            rank = environ.get(rank_var, environ.get("PMIX_RANK", ""))
            return LauncherClaim(launcher, size_var, int(size), int(rank) if rank.isdigit() else None)
    return None


def launcher_world_size(environ: Mapping[str, str]) -> int | None:
    """How many processes the launcher says it started (``launcher_claim``), or None.

    A world size that differs from this means the launcher and mpi4py belong to different MPI
    libraries (or srun lacks the PMI plugin the MPI needs): every process then initialises
    alone, as rank 0 of a world of one.
    """
    claim = launcher_claim(environ)
    return claim.size if claim is not None else None


def matching_launcher(vendor: str) -> str | None:
    """The launcher of the MPI that mpi4py uses: ``mpirun`` on PATH if it is of that MPI, else the
    MPI's own (``mpirun.mpich``, ``mpirun.openmpi`` on Debian and Ubuntu), else None.

    Args:
        vendor: ``mpi4py.MPI.get_vendor()[0]``, e.g. "Open MPI" or "MPICH".
    """
    for name in dict.fromkeys(("mpirun", _OWN_MPIRUN.get(vendor, "mpirun"))):
        path = shutil.which(name)
        version = _mpirun_version(path) if path is not None else ""
        if version and _same_mpi(version, vendor):
            return path
    return None


def _same_mpi(version: str, vendor: str) -> bool:
    """Is an mpirun whose ``--version`` says ``version`` of the MPI ``vendor``?"""
    return ("Open MPI" in version) == (vendor == "Open MPI")


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


def _mpirun_version(mpirun: str | None) -> str:
    """The first line of ``mpirun --version``; empty without mpirun or an answer."""
    if mpirun is None:
        return ""
    try:
        return _first_line(run_bounded([mpirun, "--version"], dict(os.environ), 30).stdout)
    except subprocess.TimeoutExpired:
        return ""


def _mpirun_finding(mpirun: str | None, version: str, vendor: str) -> Finding:
    """Is there an mpirun, of the same MPI as mpi4py's, that this user may run?"""
    if mpirun is None:
        return Finding("mpirun", "none on PATH", WARN, (
            "load the MPI module (or put its bin/ first on PATH); under Slurm, srun works too",))
    value = f"{mpirun}: {version or 'no --version answer'}"
    if not _same_mpi(version, vendor):
        return Finding("mpirun", value, WARN, (
            f"this mpirun is not of the {vendor} that mpi4py loaded: launched by it, every rank "
            "would be rank 0 of its own world. Use the matching mpirun (`module load` it) or "
            "rebuild mpi4py against this one with `bash jobs/setup.sh`",))
    if "Open MPI" in version and os.geteuid() == 0 and "OMPI_ALLOW_RUN_AS_ROOT" not in os.environ:
        return Finding("mpirun", value, WARN, (
            "Open MPI's mpirun refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT=1 and "
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set: `source jobs/env.sh` sets them",))
    return Finding("mpirun", value)


def run_bounded(cmd: list[str], env: Mapping[str, str], timeout: float,
                cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (typically an mpirun) with text output captured, never past ``timeout``.

    Args:
        cmd: the command line.
        env: its whole environment. Pass one explicitly: after a singleton ``MPI_Init`` in this
            process, Open MPI has added variables to the C environment that a child inherits
            by default and that make a child mpirun fail silently.
        timeout: seconds; then the command and everything it started are ended.
        cwd: working directory, default this process's.

    Returns:
        The finished process.

    Raises:
        subprocess.TimeoutExpired: on timeout, with the output so far in ``output``/``stderr``.
    """
    with subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_session(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def end_session(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a process started with ``start_new_session=True`` and everything it started.

    SIGTERM first: mpirun forwards it to its ranks and reaps them. Open MPI puts each rank in
    its own process group, so a group kill would miss them, but they stay in the session
    mpirun leads; whatever is left of that session after ``grace_s`` gets SIGKILL (Linux).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in _session_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid``, from /proc (empty where there is none)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesised command name: state ppid pgrp session ...
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            members.append(int(entry.name))
    return members


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _mpi_findings(MPI: Any, comm: Any, busy_s: float, force_probe: bool = False) -> list[Finding]:
    """The MPI checks; collective over ``comm``."""
    vendor = MPI.get_vendor()[0]
    library = MPI.Get_library_version().strip("\0 \n")
    thread_names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                    MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    findings = [
        Finding("MPI library", library.splitlines()[0]),
        Finding("MPI standard", "{}.{}".format(*MPI.Get_version())),
        Finding("thread level", f"MPI_THREAD_{thread_names[MPI.Query_thread()].upper()} provided"),
        _world_finding(MPI, comm),
    ]
    if comm.Get_size() > 1:
        findings.append(_rma_finding(rma_passive_progress(comm, busy_s), vendor, ""))
    else:
        mpirun = shutil.which("mpirun")
        version = _mpirun_version(mpirun)
        finding = _mpirun_finding(mpirun, version, vendor)
        own = shutil.which(_OWN_MPIRUN.get(vendor, "mpirun")) if finding.status == WARN else None
        own_version = _mpirun_version(own) if own and own != mpirun else ""
        if own_version and _mpirun_finding(own, own_version, vendor).status == OK:
            launch = f"{own} is {vendor}'s: launch mpips with it (the RMA probe below ran under it)"
            finding = replace(finding, advice=(*finding.advice, launch))
            mpirun, version = own, own_version
        findings.append(finding)
        findings.append(_single_rank_window_finding(MPI, vendor))
        if launcher_world_size(os.environ) is not None:  # one rank of a launched job: no nested mpirun
            probe = ProbeResult(None, busy_s=busy_s, detail="needs 2 ranks (mpirun -n 2 python -m mpips.doctor)")
            findings.append(_rma_finding(probe, vendor, ""))
        else:
            probe = _probe_with_mpirun(mpirun, version, busy_s)
            findings.append(_rma_finding(probe, vendor, f" (under {Path(mpirun).name} -n 2)" if mpirun else ""))
    libmpi = find_loaded_libmpi(Path("/proc/self/maps").read_text())
    support = query_cuda(library_lookup(libmpi), library.splitlines()[0], os.environ)
    answer = {True: "yes", False: "no", None: "unknown"}[support.aware]
    findings.append(Finding("CUDA-aware MPI", f"{answer} ({support.source}; {libmpi or 'no libmpi'})"))
    findings.append(_cuda_probe_finding(cuda_probe(comm, support.aware, force_probe)))
    return findings


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


def _cuda_probe_finding(line: str) -> Finding:
    if line.startswith("FAILED"):
        return Finding("CUDA Send/Recv", line, WARN, (
            "run GPU workers with --cuda-aware no (staging through pinned host memory)",))
    return Finding("CUDA Send/Recv", line)


def _world_finding(MPI: Any, comm: Any) -> Finding:
    """Ranks, hosts and cores; warns when ranks outnumber cores or mpirun is another MPI's."""
    size = comm.Get_size()
    hosts = comm.allgather((MPI.Get_processor_name(), os.cpu_count() or 1))
    expected = launcher_world_size(os.environ)
    if expected is not None and expected != size:
        return Finding("world", f"{size} rank(s), but the launcher started {expected}", FAIL, (
            "mpirun and mpi4py use different MPI libraries: use the mpirun that belongs to the "
            "library above (`module load` it, or put its bin/ first on PATH), or rebuild "
            "mpi4py against this mpirun's MPI with `bash jobs/setup.sh`",))
    ranks = collections.Counter(name for name, _ in hosts)
    cores = dict(hosts)
    shown = ", ".join(f"{name} ({count})" for name, count in list(ranks.items())[:8])
    more = f", ... {len(ranks) - 8} more" if len(ranks) > 8 else ""
    value = f"{size} rank(s) on {len(ranks)} host(s): {shown}{more}"
    crowded = [name for name, count in ranks.items() if count > cores[name]]
    if crowded:
        name = crowded[0]
        return Finding("world", value, WARN, (
            f"{ranks[name]} ranks share {cores[name]} cores on {name}: fine for tests, slow for "
            "training; Open MPI needs oversubscription allowed (`source jobs/env.sh` does it)",))
    return Finding("world", value)


def _single_rank_window_finding(MPI: Any, vendor: str) -> Finding:
    """Can this 1-rank world create a window over its own memory, as a server would?"""
    import numpy as np

    try:
        MPI.Win.Create(np.zeros(8), comm=MPI.COMM_SELF).Free()
    except MPI.Exception as exc:
        advice = ("run mpips with at least 2 ranks (its roles need them anyway)",)
        if vendor == "Open MPI":
            advice += ("Open MPI's osc/rdma needs a shared-memory peer and Debian disables "
                       "osc/pt2pt: OMPI_MCA_osc=sm,rdma,pt2pt with "
                       "MPI4PY_RC_THREAD_LEVEL=serialized makes 1-rank windows work",)
        return Finding("1-rank window", f"MPI.Win.Create fails: {exc.Get_error_string()}",
                       WARN, advice)
    return Finding("1-rank window", "MPI.Win.Create works")


def _rma_finding(probe: ProbeResult, vendor: str, where: str) -> Finding:
    """The probe's line; ``where`` says how it ran when not in this job's own world."""
    value = probe.describe() + where
    if probe.passive:
        return Finding("passive RMA", value)
    if probe.passive is None:
        return Finding("passive RMA", value, WARN)
    advice = ["parameter pulls would wait for a busy server to call MPI; mpips falls back to "
              "message-based pulls (--pull auto)"]
    if "MPICH" in vendor and os.environ.get("MPIR_CVAR_ASYNC_PROGRESS") != "1":
        advice.append("MPICH: MPIR_CVAR_ASYNC_PROGRESS=1 starts a progress thread per rank "
                      "(needs MPI_THREAD_MULTIPLE, the mpi4py default) and makes pulls one-sided; "
                      "each such thread keeps a core busy, so set it only with a core to spare per "
                      "rank (4 ranks on 2 cores: the default job took 20x longer)")
    return Finding("passive RMA", value, WARN, tuple(advice))


def _package_findings() -> list[Finding]:
    """h5py, torch, numpy and thread settings of this process."""
    findings = []
    try:
        import h5py
    except ImportError as exc:
        findings.append(Finding("h5py", f"cannot import: {exc}", FAIL, (SETUP_ADVICE,)))
    else:
        mpi_io = h5py.get_config().mpi
        findings.append(Finding(
            "h5py", f"{h5py.__version__}, HDF5 {h5py.version.hdf5_version}, "
                    f"MPI-IO {'yes' if mpi_io else 'no'}",
            OK if mpi_io else WARN,
            () if mpi_io else ("h5py was built without MPI-IO, so ranks cannot share one HDF5 "
                               "file through MPI-IO: re-run `bash jobs/setup.sh`, which builds "
                               "it against parallel HDF5",)))
    try:
        import torch
    except ImportError as exc:
        findings.append(Finding("torch", f"cannot import: {exc}", FAIL, (SETUP_ADVICE,)))
        threads = None
    else:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            gpu = f"CUDA {torch.version.cuda}, {count} device(s): {torch.cuda.get_device_name(0)}"
        else:
            gpu = "CUDA not available"
        findings.append(Finding("torch", f"{torch.__version__}, {gpu}"))
        threads = torch.get_num_threads()
    try:
        import numpy
    except ImportError as exc:
        findings.append(Finding("numpy", f"cannot import: {exc}", FAIL, (SETUP_ADVICE,)))
    else:
        findings.append(Finding("numpy", numpy.__version__))
    findings.append(_threads_finding(threads))
    return findings


def _threads_finding(torch_threads: int | None) -> Finding:
    omp = os.environ.get("OMP_NUM_THREADS")
    value = f"OMP_NUM_THREADS={omp if omp is not None else '(unset)'}"
    if torch_threads is not None:
        value += f", torch uses {torch_threads} thread(s)"
    value += f", {os.cpu_count()} core(s) on this host"
    if omp is None:
        return Finding("threads", value, WARN, (
            "every rank starts one torch thread per core; with several ranks per node set "
            "OMP_NUM_THREADS (cores / ranks per node; `source jobs/env.sh` sets 1)",))
    return Finding("threads", value)


def _report(findings: list[Finding]) -> str:
    width = max(len(f.label) for f in findings)
    marks = {OK: "  ", WARN: "! ", FAIL: "X "}
    lines = ["mpips doctor"]
    lines += [f"{marks[f.status]}{f.label:<{width}}  {f.value}" for f in findings]
    advice = [(f.label, a) for f in findings for a in f.advice]
    if advice:
        lines.append("advice:")
        lines += [f"  - {label}: {text}" for label, text in advice]
    failed = [f.label for f in findings if f.status == FAIL]
    lines.append(f"result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'OK'}")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mpips.doctor", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=float, default=1.0, metavar="SECONDS",
                        help="how long the RMA probe's target computes without MPI (default 1)")
    parser.add_argument("--launcher", action="store_true",
                        help="print only the path of the launcher (mpirun) of the MPI that mpi4py uses; "
                             "exit status 1 when there is none (used by jobs/run.sh)")
    parser.add_argument("--cuda-probe", action="store_true",
                        help="with GPUs: run the device-buffer Send/Recv probe even where the MPI library"
                             " does not say it is CUDA-aware (it may crash there)")
    parser.add_argument("--rma-probe", action="store_true",
                        help="run only the passive RMA probe (2+ ranks); rank 0 prints it as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every check, print the report on rank 0, and return the exit status."""
    args = _parse_args(argv)
    if args.launcher:
        return _print_launcher()
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        findings = [Finding("mpi4py", f"cannot import: {exc}", FAIL, (SETUP_ADVICE,))]
        print(_report(findings + _package_findings()), flush=True)
        return 1
    comm = MPI.COMM_WORLD
    if args.rma_probe:
        probe = rma_passive_progress(comm, args.busy)
        if comm.Get_rank() == 0:
            print(json.dumps(asdict(probe)), flush=True)
        return 0 if probe.passive is not None else 1
    findings = _mpi_findings(MPI, comm, args.busy, args.cuda_probe) + _package_findings()
    status = 1 if any(f.status == FAIL for f in findings) else 0
    if comm.Get_rank() == 0:
        print(_report(findings), flush=True)
    return comm.allreduce(status, op=MPI.MAX)


def _print_launcher() -> int:
    """``--launcher``: which MPI mpi4py was built for needs no MPI_Init, so none is made."""
    try:
        import mpi4py

        mpi4py.rc.initialize = False
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        print(f"mpips.doctor: cannot import mpi4py: {exc}", file=sys.stderr)
        return 1
    vendor = MPI.get_vendor()[0]
    launcher = matching_launcher(vendor)
    if launcher is None:
        print(f"mpips.doctor: no mpirun of {vendor} (the MPI mpi4py uses) on PATH", file=sys.stderr)
        return 1
    print(launcher)
    return 0


if __name__ == "__main__":
    sys.exit(main())

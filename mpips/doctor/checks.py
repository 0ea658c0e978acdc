"""The doctor's findings: one ``Finding`` per check (MPI, launcher, ranks, RMA, CUDA, packages,
threads) and the report rank 0 prints."""

from __future__ import annotations

import collections
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mpips.cuda_aware import library_lookup
from mpips.cuda_aware import query as query_cuda
from mpips.doctor.launcher import _OWN_MPIRUN, _mpirun_version, _same_mpi, launcher_world_size
from mpips.doctor.probes import ProbeResult, _probe_with_mpirun, cuda_probe, find_loaded_libmpi, rma_passive_progress

__all__ = [
    "Finding",
    "FAIL",
    "OK",
    "SETUP_ADVICE",
    "WARN",
]


OK, WARN, FAIL = "ok", "warn", "fail"
SETUP_ADVICE = "run `bash jobs/setup.sh` (or `pip install -e .` in an environment that has it)"


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

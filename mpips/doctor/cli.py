"""``python -m mpips.doctor`` (and the ``mpips-doctor`` console script): arguments, the checks, the
exit status."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mpips.doctor.checks import FAIL, SETUP_ADVICE, Finding, _mpi_findings, _package_findings, _report
from mpips.doctor.launcher import matching_launcher
from mpips.doctor.probes import rma_passive_progress

__all__ = [
    "main",
]


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

"""mpips.doctor: the pure helpers, the RMA probe on every rank, and the command end to end."""

from __future__ import annotations

import ctypes.util
import re
import subprocess
import sys

import pytest
from helpers import mpi_env, run_mpi

from mpips import doctor
from mpips.doctor import (
    LauncherClaim,
    ProbeResult,
    checks,
    cuda_aware,
    find_loaded_libmpi,
    launcher,
    launcher_claim,
    launcher_world_size,
    rma_passive_progress,
)

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/python3.11
7f1c2a000000-7f1c2a100000 r-xp 00000000 08:01 2345 /usr/lib/x86_64-linux-gnu/libmpi_cxx.so.40.30.1
7f1c2b000000-7f1c2b200000 r-xp 00000000 08:01 3456 /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4
7f1c2c000000-7f1c2c021000 rw-p 00000000 00:00 0
7f1c2d000000-7f1c2d100000 r-xp 00000000 08:01 4567 {path}
"""


def test_find_loaded_libmpi_takes_the_mpi_library_not_its_bindings():
    assert find_loaded_libmpi(MAPS.format(path="/lib/libc.so.6")) == (
        "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4")


@pytest.mark.parametrize("path", [
    "/opt/cray/pe/lib64/libmpi_cray.so.12",
    "/usr/lib/x86_64-linux-gnu/libmpich.so.12.3.0",
    "/opt/intel/oneapi/mpi/2021.9.0/lib/release/libmpi.so.12",
    "/opt/my mpi/lib/libmpi.so",
])
def test_find_loaded_libmpi_knows_other_vendors(path):
    maps = "\n".join(line for line in MAPS.format(path=path).splitlines()
                     if "libmpi.so.40" not in line)
    assert find_loaded_libmpi(maps) == path


def test_find_loaded_libmpi_without_mpi():
    assert find_loaded_libmpi("") is None
    assert find_loaded_libmpi("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libmpi_usempif08.so.40\n") is None


def test_cuda_aware_is_unknown_without_the_symbol_or_the_library():
    assert cuda_aware(ctypes.util.find_library("c")) is None
    assert cuda_aware("/nonexistent/libmpi.so.40") is None


def test_launcher_world_size():
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert launcher_world_size({"PMI_SIZE": "6", "PMI_RANK": "2"}) == 6
    assert launcher_world_size({"HOME": "/root"}) is None
    assert launcher_world_size({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}) == 8  # srun


def test_launcher_claim_says_who_started_this_process_and_its_number():
    assert launcher_claim({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}) == LauncherClaim(
        "Open MPI's mpirun", "OMPI_COMM_WORLD_SIZE", 4, 3)
    assert launcher_claim({"PMI_SIZE": "6", "PMI_RANK": "0"}).rank == 0
    assert launcher_claim({"SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"}) == LauncherClaim(
        "srun", "SLURM_STEP_NUM_TASKS", 2, 1)
    # mpirun inside a Slurm allocation: its ranks carry srun's variables for mpirun's daemons too
    both = {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "5", "SLURM_STEP_NUM_TASKS": "2"}
    assert launcher_claim(both).size == 16
    assert launcher_claim({"SLURM_NTASKS": "8"}) is None  # a batch script: one process is legitimate


@pytest.mark.parametrize("versions, vendor, expected", [
    ({"mpirun": "mpirun (Open MPI) 4.1.4"}, "Open MPI", "/bin/mpirun"),
    ({"mpirun": "mpirun (Open MPI) 4.1.4", "mpirun.mpich": "HYDRA build details:"}, "MPICH", "/bin/mpirun.mpich"),
    ({"mpirun": "mpirun (Open MPI) 4.1.4"}, "MPICH", None),
    ({}, "Open MPI", None),
])
def test_matching_launcher_is_of_the_mpi_that_mpi4py_uses(monkeypatch, versions, vendor, expected):
    monkeypatch.setattr(launcher.shutil, "which", lambda name: f"/bin/{name}" if name in versions else None)
    monkeypatch.setattr(launcher, "_mpirun_version", lambda path: versions[path.removeprefix("/bin/")])
    assert doctor.matching_launcher(vendor) == expected


def test_launcher_option_prints_the_launcher_without_initialising_mpi():
    done = subprocess.run([sys.executable, "-m", "mpips.doctor", "--launcher"], env=mpi_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([done.stdout.strip(), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert ("Open MPI" in version) == ("Open MPI" in _mpi4py_vendor())


def _mpi4py_vendor() -> str:
    code = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(MPI.get_vendor()[0])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout


def test_probe_result_describes_itself():
    assert ProbeResult(True, 0.0005, 1.0, 1 << 20).describe().startswith(
        "yes: a 1 MiB Get took 0.50 ms")
    assert ProbeResult(False, 0.98, 1.0, 4096).describe().startswith(
        "no: a 4096 B Get waited 0.98 s")
    assert ProbeResult(None, detail="needs 2 ranks").describe() == "not tested: needs 2 ranks"


@pytest.mark.parametrize("version, vendor, warns", [
    ("mpirun (Open MPI) 4.1.4", "Open MPI", False),
    ("HYDRA build details:", "MPICH", False),
    ("HYDRA build details:", "Open MPI", True),  # every rank would be rank 0 of 1
    ("mpirun (Open MPI) 5.0.3", "MPICH", True),
])
def test_mpirun_of_another_mpi_is_flagged(monkeypatch, version, vendor, warns):
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    finding = checks._mpirun_finding("/usr/bin/mpirun", version, vendor)
    assert (finding.status == doctor.WARN) == warns, finding
    assert ("not of the" in " ".join(finding.advice)) == warns, finding


def test_root_without_permission_is_flagged_for_open_mpi_only(monkeypatch):
    monkeypatch.delenv("OMPI_ALLOW_RUN_AS_ROOT", raising=False)
    monkeypatch.setattr(checks.os, "geteuid", lambda: 0)
    finding = checks._mpirun_finding("/usr/bin/mpirun", "mpirun (Open MPI) 4.1.4", "Open MPI")
    assert finding.status == doctor.WARN and "OMPI_ALLOW_RUN_AS_ROOT=1" in finding.advice[0]
    assert checks._mpirun_finding("/usr/bin/mpirun", "HYDRA", "MPICH").status == doctor.OK


@pytest.mark.mpi(min_size=2, sizes=(2, 4))
def test_rma_probe_agrees_on_every_rank():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    result = rma_passive_progress(comm, busy_s=0.5, nbytes=1 << 16)
    assert comm.allgather(result) == [result] * comm.Get_size()
    assert result.passive is not None, result.detail
    assert result.nbytes == 1 << 16 and result.busy_s == 0.5
    if MPI.get_vendor()[0] == "Open MPI":
        # Open MPI's osc/rdma reads the target's memory directly over shared memory.
        assert result.passive, result.describe()
        assert result.latency_s < 0.1, result.describe()


def _doctor(*launcher: str) -> subprocess.CompletedProcess[str]:
    if launcher:
        return run_mpi(int(launcher[0]), ["-m", "mpips.doctor", "--busy", "0.5"], timeout=120)
    return subprocess.run([sys.executable, "-m", "mpips.doctor", "--busy", "0.5"], env=mpi_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("launcher", [(), ("2",)], ids=["alone", "mpirun-2"])
def test_doctor_reports_this_machine(launcher):
    result = _doctor(*launcher)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("mpips doctor") == 1, out  # rank 0 only
    for label in ("MPI library", "MPI standard", "thread level", "world", "passive RMA",
                  "CUDA-aware MPI", "CUDA Send/Recv", "h5py", "torch", "numpy", "threads"):
        assert re.search(rf"^[ !] {label}  ", out, re.MULTILINE), out  # ok or warn (MPICH: passive RMA)
    assert "MPI-IO yes" in out, out
    assert f"{2 if launcher else 1} rank(s)" in out, out
    assert ("  mpirun" in out) == (not launcher), out  # which mpirun, checked when alone
    assert out.rstrip().endswith("result: OK"), out
    import torch

    if not torch.cuda.is_available():  # the device-buffer probe says why it did not run
        want = "not run: no GPU visible to torch on rank 0 or rank 1" if launcher else "not run: needs 2 ranks"
        assert re.search(rf"^  CUDA Send/Recv +{want}", out, re.MULTILINE), out
    if "Open MPI" in out.split("MPI library", 1)[1].splitlines()[0]:
        assert re.search(r"passive RMA +yes:", out), out


def test_doctor_fails_with_advice_when_a_package_is_missing():
    hide = ("import sys; sys.modules['h5py'] = None; from mpips.doctor import main; "
            "sys.exit(main(['--busy', '0.2']))")
    result = subprocess.run([sys.executable, "-c", hide], env=mpi_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "X h5py" in result.stdout and "jobs/setup.sh" in result.stdout, result.stdout
    assert "result: FAIL (h5py)" in result.stdout, result.stdout

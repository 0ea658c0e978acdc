"""The job scripts of ``jobs/slurm/`` against a real Slurm, as a user submits them.

A session fixture starts a private one-node Slurm with ``jobs/slurm-local.sh`` (root; the Debian
packages are installed when missing) and stops it at the end, failed tests included. If Slurm
cannot start, every test here fails with the script's reason; nothing is skipped, unless
``MPIPS_SLURM_TESTS=0`` says so (then pytest reports the skip). ``jobs/test.sh`` runs these tests
in a stage of their own (marker ``slurm``).

Jobs are submitted from a temporary directory with the environment of a fresh login shell (system
PATH, no virtual environment, no Open MPI settings), so each script must find its checkout and
source that checkout's ``jobs/env.sh`` itself. Only ``VENV`` (where this interpreter's virtual
environment is not the checkout's ``.venv``) and ``PYTHONPATH`` (where set) are passed on.

The node is this machine (``hostname -s``) declaring 8 CPUs and 4 GPUs that are links to
/dev/null: enough for jobs of 3-5 tasks and for ``--gres=gpu:N`` to be accepted. With one node,
placement across nodes is checked against Slurm's host list of one host; the spreading rule
itself is tested with made-up host lists in test_layout.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
        "DEADLINE", "PREEMPTED"}


class Slurm:
    """The private cluster: submit jobs, wait for them, read what Slurm says about them."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A fresh login shell's environment pointed at this cluster, plus ``extra``."""
        env = {"PATH": LOGIN_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
               "SLURM_CONF": str(self.conf)}
        for name in ("USER", "LOGNAME", "PYTHONPATH"):
            if name in os.environ:
                env[name] = os.environ[name]
        if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
            env["VENV"] = sys.prefix
        env.update(extra or {})
        return env

    def run(self, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=cwd, env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (), cwd: Path,
               env: dict[str, str] | None = None) -> int:
        """Submit ``jobs/slurm/<script> *args`` from ``cwd``; the job id."""
        done = self.run("sbatch", "--parsable", *options, str(REPO / "jobs" / "slurm" / script), *args,
                        cwd=cwd, env=env)
        assert done.returncode == 0, f"sbatch {script} failed: {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, NodeList, ...)."""
        done = self.run("scontrol", "show", "job", "-o", str(job))
        assert done.returncode == 0, f"scontrol show job {job}: {done.stderr}"
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait(self, job: int, log: Path, restarts: int = 0, timeout: float = 240) -> dict[str, str]:
        """Wait until the job has ended after ``restarts`` requeues; its final fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] in DONE and int(info["Restarts"]) >= restarts:
                return info
            time.sleep(0.5)
        self.run("scancel", str(job))
        raise AssertionError(f"job {job} still {info['JobState']} after {timeout:g} s; its log:\n{read(log)}")

    def hostnames(self, nodelist: str) -> list[str]:
        done = self.run("scontrol", "show", "hostnames", nodelist)
        return done.stdout.split()


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def wait_for(log: Path, pattern: str, after: int = 0, timeout: float = 120) -> re.Match[str]:
    """The first match of ``pattern`` (multiline) in ``log`` at or after character ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.compile(pattern, re.M).search(read(log), after)
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"no /{pattern}/ in {log} within {timeout:g} s:\n{read(log)}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    if os.environ.get("MPIPS_SLURM_TESTS") == "0":
        pytest.skip("MPIPS_SLURM_TESTS=0: the job scripts are not tested against Slurm in this run")
    where = Path(os.environ.get("MPIPS_SLURM_DIR") or tmp_path_factory.mktemp("slurm"))
    script = str(REPO / "jobs" / "slurm-local.sh")
    try:
        started = subprocess.run(["bash", script, "start", str(where)], capture_output=True, text=True,
                                 timeout=600, stdin=subprocess.DEVNULL)
        if started.returncode != 0:
            pytest.fail(f"a private Slurm could not start (bash {script} start {where}):\n"
                        f"{started.stdout}{started.stderr}", pytrace=False)
        yield Slurm(where / "slurm.conf")
    finally:
        stopped = subprocess.run(["bash", script, "stop", str(where)], capture_output=True, text=True,
                                 timeout=120, stdin=subprocess.DEVNULL)
        assert stopped.returncode == 0, f"stopping the private Slurm failed:\n{stopped.stderr}"


def role_map(log: str) -> list[tuple[int, str, str, int, int]]:
    """(rank, host, role, index, local rank) of each row of the role map in a job's log."""
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(worker|server|data-server)\s+(\d+)\s+(\d+)$", log, re.M)
    return [(int(r), host, role, int(i), int(local)) for r, host, role, i, local in rows]


def mpi_vendor() -> str:
    done = subprocess.run([sys.executable, "-c", "import mpi4py; mpi4py.rc.initialize = False\n"
                           "from mpi4py import MPI; print(MPI.get_vendor()[0])"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def test_train_dry_run_prints_the_role_map_on_slurms_hosts(slurm: Slurm, tmp_path: Path):
    """train.sbatch as shipped: srun with the PMI plugin this MPI needs, and the role map names
    the hosts Slurm allocated, servers on the highest ranks of the node."""
    job = slurm.sbatch("train.sbatch", "--dry-run", "--servers", "2", cwd=tmp_path,
                       options=("--nodes=1", "--ntasks-per-node=5", "--cpus-per-task=1", "--time=5"))
    log = tmp_path / f"mpips-{job}.out"
    info = slurm.wait(job, log)
    text = read(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    if mpi_vendor() == "Open MPI":
        assert "mpips: srun --mpi=pmix" in text, text
    rows = role_map(text)
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4], text
    hosts = slurm.hostnames(info["NodeList"])
    assert {r[1] for r in rows} == set(hosts), f"role map hosts vs Slurm's {hosts}:\n{text}"
    assert [r[2] for r in rows] == ["worker", "worker", "data-server", "server", "server"], text
    assert f"checkout {REPO}" in text, text


def test_gpu_script_gives_each_gpu_a_worker(slurm: Slurm, tmp_path: Path):
    """train-gpu.sbatch: one worker per GPU of the node, on local ranks 0..GPUs-1, the node's
    other task a server (role map on CPU, with --dry-run); its own flags refused as arguments;
    no GPU in the allocation said in one line."""
    geometry = ("--nodes=1", "--ntasks-per-node=3", "--cpus-per-task=1", "--time=5")
    ok = slurm.sbatch("train-gpu.sbatch", "--dry-run", options=("--gres=gpu:2", *geometry), cwd=tmp_path)
    refused = slurm.sbatch("train-gpu.sbatch", "--servers", "2", options=("--gres=gpu:2", *geometry),
                           cwd=tmp_path)
    no_gpu = slurm.sbatch("train-gpu.sbatch", "--dry-run", options=("--gres=gpu:0", *geometry), cwd=tmp_path)

    log = tmp_path / f"mpips-{ok}.out"
    info = slurm.wait(ok, log)
    text = read(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "1 node(s) x (2 GPU workers + 1 parameter server(s) + 0 data server(s))" in text, text
    rows = role_map(text)
    assert [(r[2], r[4]) for r in rows] == [("worker", 0), ("worker", 1), ("server", 2)], text
    assert {r[1] for r in rows} == set(slurm.hostnames(info["NodeList"])), text

    for job, says in ((refused, "--servers: this script sets it"),
                      (no_gpu, "no GPU in this allocation: submit with --gres=gpu:N")):
        log = tmp_path / f"mpips-{job}.out"
        info = slurm.wait(job, log)
        lines = read(log).splitlines()
        assert info["ExitCode"] == "2:0" and len(lines) == 1 and says in lines[0], read(log)


def test_preempted_job_requeues_resumes_and_ends_as_an_uninterrupted_run(slurm: Slurm, tmp_path: Path):
    """SIGUSR1 by scancel, twice: to every task (``--signal=USR1``, as ``--signal=USR1@T`` sends
    it), then to the batch shell only (``--batch``), which passes it on through srun. Each time
    mpips checkpoints, exits 75, the script requeues, and the requeued job resumes; the final
    model (bsp) is bitwise the model of the same job run without interruption."""
    import torch

    steps = 400
    geometry = ("--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=10")
    ref = slurm.sbatch("train.sbatch", "--steps", str(steps), "--save", "uninterrupted.pt", options=geometry,
                       cwd=tmp_path, env={"MPIPS_CKPT_DIR": str(tmp_path / "ckpt-uninterrupted")})
    job = slurm.sbatch("train.sbatch", "--steps", str(steps), "--save", "resumed.pt", options=geometry,
                       cwd=tmp_path, env={"MPIPS_CKPT_DIR": str(tmp_path / "ckpt")})
    log = tmp_path / f"mpips-{job}.out"

    stops = []
    for restart, how in ((0, ()), (1, ("--batch",))):
        start = wait_for(log, rf"^mpips: job {job} \(restart {restart}\)").end()
        # a progress line well past the resumed step: the ranks run and handle signals
        first = int(wait_for(log, rf"^step (\d+)/{steps}", start).group(1))
        wait_for(log, rf"^step {first + 20}/{steps}", start)
        done = slurm.run("scancel", "--signal=USR1", *how, str(job))
        assert done.returncode == 0, done.stderr
        stopped = wait_for(log, r"^stopped on SIGUSR1 at step (\d+) of", start)
        stops.append(int(stopped.group(1)))
        wait_for(log, rf"^mpips: checkpointed \(exit status 75\); requeueing job {job}$", start)

    info = slurm.wait(job, log, restarts=2)
    text = read(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text
    assert 0 < stops[0] < stops[1] < steps, text
    for step in stops:
        assert f"resuming from {tmp_path / 'ckpt'}/ckpt-{step:08d}.h5 at step {step}" in text, text
    assert text.count("SIGUSR1 reached the batch shell; passing it to srun") == 1, text

    ref_info = slurm.wait(ref, tmp_path / f"mpips-{ref}.out")
    assert (ref_info["JobState"], ref_info["Restarts"]) == ("COMPLETED", "0"), read(tmp_path / f"mpips-{ref}.out")
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    assert uninterrupted.keys() == resumed.keys()
    for name, value in uninterrupted.items():
        assert value.dtype == resumed[name].dtype and torch.equal(value, resumed[name]), name


def test_scancel_ends_the_job_with_a_checkpoint_and_no_requeue(slurm: Slurm, tmp_path: Path):
    """A plain ``scancel``: SIGTERM to every task (and the batch shell), KillWait before SIGKILL.
    mpips checkpoints within it and exits 75, but the job ends: the script does not requeue it."""
    job = slurm.sbatch("train.sbatch", "--steps", "400", cwd=tmp_path, env={"MPIPS_CKPT_DIR": str(tmp_path / "ckpt")},
                       options=("--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=10"))
    log = tmp_path / f"mpips-{job}.out"
    wait_for(log, r"^step 20/400")
    done = slurm.run("scancel", str(job))
    assert done.returncode == 0, done.stderr
    info = slurm.wait(job, log)
    text = read(log)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), text
    step = int(wait_for(log, r"^stopped on SIGTERM at step (\d+) of 400: checkpoint").group(1))
    assert (tmp_path / "ckpt" / f"ckpt-{step:08d}.h5").exists(), text
    assert "SIGTERM reached the batch shell: Slurm is ending the job; no requeue" in text, text
    assert f"mpips: checkpointed in {tmp_path / 'ckpt'}, not requeued" in text, text
    assert "requeueing" not in text, text


def test_a_late_sigusr1_does_not_fail_a_finished_job(slurm: Slurm, tmp_path: Path):
    """``--signal=USR1@T`` comes up to ~30 s late, so it can reach a job that has just finished:
    SIGUSR1 sent again and again from the end of training until the job is gone must not kill a
    rank in its shutdown (Python restores the default action, terminate, of its handlers there)."""
    job = slurm.sbatch("train.sbatch", "--steps", "30", "--save", "model.pt", cwd=tmp_path,
                       env={"MPIPS_CKPT_DIR": str(tmp_path / "ckpt")},
                       options=("--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=10"))
    log = tmp_path / f"mpips-{job}.out"
    wait_for(log, r"^saved model state_dict to model.pt$")
    sent = 0
    while slurm.job(job)["JobState"] == "RUNNING" and sent < 500:
        sent += slurm.run("scancel", "--signal=USR1", str(job)).returncode == 0
    info = slurm.wait(job, log)
    text = read(log)
    assert sent > 0, text
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), f"{sent} sent\n{text}"


def test_test_job_runs_the_suite(slurm: Slurm, tmp_path: Path):
    """test.sbatch as shipped, on a selection: every stage runs inside the allocation (mpirun for
    the mpi stage), and the stage that would start another Slurm says it did not run."""
    job = slurm.sbatch("test.sbatch", "-k", "test_layout or test_rma_probe_agrees_on_every_rank",
                       options=("--ntasks=2", "--time=10"), cwd=tmp_path, env={"MPIPS_TEST_SIZES": "2"})
    log = tmp_path / f"mpips-test-{job}.out"
    info = slurm.wait(job, log)
    text = read(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    summary = text[text.index("=== summary"):]
    assert re.search(r"^unit \+ end-to-end \(plain pytest\)\s+passed", summary, re.M), summary
    assert re.search(r"^mpi tests, 2 rank\(s\)\s+passed .* 1 passed", summary, re.M), summary
    assert re.search(r"^job scripts on a private Slurm\s+not run \(MPIPS_SLURM_TESTS=0\)", summary, re.M), summary
    assert re.search(r"^total\s+passed", summary, re.M), summary


def test_srun_without_the_pmi_plugin_is_named_in_one_line(slurm: Slurm, tmp_path: Path):
    """``srun --mpi=none`` starts every task as rank 0 of a world of 1 (or, with Open MPI, fails
    in MPI_Init): mpips says so once, with the fix, before MPI_Init (``mpips.launch``), exit 2."""
    env = slurm.env()
    done = subprocess.run(
        ["bash", "-c", 'source "$1" && exec srun --mpi=none -n 4 --time=5 python -m mpips.train --steps 5',
         "bash", str(REPO / "jobs" / "env.sh")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    mpips_lines = [line for line in output.splitlines() if line.startswith("mpips:")]
    assert done.returncode == 2, output
    assert len(mpips_lines) == 1 and "--mpi=pmix" in mpips_lines[0], output
    assert "OMPI was not built with SLURM's PMI support" not in output, output


def test_requeued_jobs_make_progress_after_a_late_kill_and_a_corrupt_checkpoint(slurm: Slurm, tmp_path: Path):
    """Two jobs a requeue used to fail, both ending COMPLETED with the same final model (bsp, bitwise).

    Job A is preempted (SIGUSR1, checkpoint, requeued) and its newest checkpoint is truncated while
    it waits: the restart falls back to the one before, in one line, and trains to the end. Job B
    loses its lead rank after its final checkpoint (SIGKILL in the shutdown): it fails, is requeued
    (as Slurm does after a node failure), and the restart says the run is complete, writes the
    final model from the checkpoint and exits 0."""
    import torch

    steps, geometry = 200, ("--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=10")
    flags = ("--steps", str(steps), "--checkpoint-every", "40")
    a = slurm.sbatch("train.sbatch", *flags, "--save", "a.pt", options=geometry, cwd=tmp_path,
                     env={"MPIPS_CKPT_DIR": str(tmp_path / "ck-a")})
    b = slurm.sbatch("train.sbatch", *flags, "--save", "b.pt", options=geometry, cwd=tmp_path,
                     env={"MPIPS_CKPT_DIR": str(tmp_path / "ck-b"), "MPIPS_FAULT": "rank=0,phase=shutdown,kind=kill"})
    log_a, log_b = tmp_path / f"mpips-{a}.out", tmp_path / f"mpips-{b}.out"

    wait_for(log_a, rf"^step (9\d|1\d\d)/{steps}")  # past the checkpoints of steps 40 and 80
    assert slurm.run("scancel", "--signal=USR1", str(a)).returncode == 0
    stop = int(wait_for(log_a, rf"^stopped on SIGUSR1 at step (\d+) of {steps}").group(1))
    wait_for(log_a, rf"^mpips: checkpointed \(exit status 75\); requeueing job {a}$")
    newest = tmp_path / "ck-a" / f"ckpt-{stop:08d}.h5"
    with open(newest, "r+b") as f:  # the restart waits ~11 s (cred_expire): time enough
        f.truncate(newest.stat().st_size // 2)
    previous = max(s for s in (40, 80, 120, 160) if s < stop)

    info_b = slurm.wait(b, log_b)
    assert info_b["JobState"] == "FAILED" and info_b["Restarts"] == "0", read(log_b)
    assert (tmp_path / "ck-b" / f"ckpt-{steps:08d}.h5").exists() and not (tmp_path / "b.pt").exists()
    assert slurm.run("scontrol", "requeue", str(b)).returncode == 0

    info_a = slurm.wait(a, log_a, restarts=1)
    text_a = read(log_a)
    assert (info_a["JobState"], info_a["ExitCode"], info_a["Restarts"]) == ("COMPLETED", "0:0", "1"), text_a
    assert text_a.count("skipping checkpoint:") == 1 and f"{newest}: unreadable checkpoint" in text_a, text_a
    assert f"resuming from {tmp_path / 'ck-a'}/ckpt-{previous:08d}.h5 at step {previous}" in text_a, text_a

    info_b = slurm.wait(b, log_b, restarts=1)
    text_b = read(log_b)
    assert (info_b["JobState"], info_b["ExitCode"], info_b["Restarts"]) == ("COMPLETED", "0:0", "1"), text_b
    assert f"mpips: the run is complete: {tmp_path / 'ck-b'}/ckpt-{steps:08d}.h5" in text_b, text_b
    assert "requeueing" not in text_b, text_b

    final_a, final_b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert final_a.keys() == final_b.keys()
    for name, value in final_a.items():
        assert torch.equal(value, final_b[name]), name

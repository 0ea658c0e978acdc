"""mpips.launch: what happens before MPI_Init (signals held, srun without a PMI plugin named)."""

import os
import subprocess
import sys

import pytest

from mpips.launch import srun_without_pmi


@pytest.mark.parametrize("environ, tasks", [
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, 4),  # srun --mpi=none
    ({"SLURM_STEP_NUM_TASKS": "4", "PMIX_RANK": "2"}, 0),  # srun --mpi=pmix
    ({"SLURM_STEP_NUM_TASKS": "4", "PMI_FD": "5", "PMI_RANK": "2"}, 0),  # srun --mpi=pmi2
    ({"SLURM_STEP_NUM_TASKS": "1", "OMPI_COMM_WORLD_RANK": "0"}, 0),  # mpirun inside sbatch
    ({"SLURM_STEP_NUM_TASKS": "1"}, 0),  # one task: a world of one is right
    ({}, 0),  # no Slurm
])
def test_srun_without_pmi_reads_the_launch_from_the_environment(environ, tasks):
    assert srun_without_pmi(environ) == tasks


def _train_as_srun_task(procid: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "SLURM_"))}
    env.update(SLURM_STEP_NUM_TASKS="4", SLURM_PROCID=str(procid))
    return subprocess.run([sys.executable, *args, "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("entry", [["-m", "mpips.train"], ["-m", "mpips"]], ids=["mpips.train", "mpips"])
def test_srun_without_a_pmi_plugin_is_said_once_before_mpi_init(entry):
    """Task 0 says it in one line with the fix, the others say nothing; all exit 2 (Open MPI would
    abort inside MPI_Init on every task, each with its own text)."""
    first, other = _train_as_srun_task(0, *entry), _train_as_srun_task(3, *entry)
    assert (first.returncode, other.returncode) == (2, 2), first.stderr + other.stderr
    assert first.stdout == other.stdout == other.stderr == ""
    (line,) = first.stderr.splitlines()
    assert line.startswith("mpips: bad launch: srun started 4 tasks") and "srun --mpi=pmix" in line

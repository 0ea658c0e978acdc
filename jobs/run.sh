#!/usr/bin/env bash
# Train with mpips on this machine (after `bash jobs/setup.sh`):
#
#   bash jobs/run.sh                          # the default job: 4 ranks, MLP on UCI digits
#   NP=6 bash jobs/run.sh --servers 2         # any `python -m mpips.train --help` flags
#   MPIPS_TIMEOUT=3600 bash jobs/run.sh ...   # wall-clock limit in seconds (default 900)
#   MPIRUN=/opt/mpi/bin/mpirun bash jobs/run.sh  # this launcher (default: the one of mpi4py's MPI)
#
# On a cluster use `sbatch jobs/slurm/train.sbatch` (or srun) instead.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/jobs/env.sh"

limit=${MPIPS_TIMEOUT:-900}
# The launcher of the MPI that mpi4py was built for: Debian's plain `mpirun` is whichever MPI
# update-alternatives picked, and under another MPI's launcher every rank runs alone.
mpirun=${MPIRUN:-$(python -m mpips.doctor --launcher || echo mpirun)}
# --foreground keeps mpirun in this terminal's process group, so Ctrl-C reaches it directly.
rc=0
timeout --foreground --kill-after=30 "$limit" "$mpirun" -n "${NP:-4}" python -m mpips.train "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
    echo "jobs/run.sh: stopped the job after ${limit} s (raise MPIPS_TIMEOUT to allow more)" >&2
fi
exit "$rc"

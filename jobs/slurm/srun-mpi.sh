#!/usr/bin/env bash
# Print the srun MPI plugin (`srun --mpi=...`) that the MPI of this checkout's mpi4py needs; print
# nothing to keep the site's MpiDefault. The job scripts of jobs/slurm/ launch with it; by hand:
#
#   source jobs/env.sh
#   srun --mpi="$(bash jobs/slurm/srun-mpi.sh)" -n 4 python -m mpips.doctor
#
#   MPIPS_SRUN_MPI=pmi2 sbatch jobs/slurm/train.sbatch ...   # what a site needs, if it differs
#   MPIPS_SRUN_MPI=default ...                               # no --mpi: the site's MpiDefault
#
# Open MPI (4.x with PMIx, as Debian's; 5.x always) starts under srun only with --mpi=pmix: with
# Slurm's default `none` every task fails inside MPI_Init ("OMPI was not built with SLURM's PMI
# support"), and with pmi2 too unless Open MPI was built against Slurm's libpmi2. So: pmix when
# this Slurm has it (`srun --mpi=list`), else pmi2. Other MPIs (MPICH, Intel MPI, Cray MPICH) get
# the site's MpiDefault, which sites set for the MPI they ship; where that is wrong, set
# MPIPS_SRUN_MPI. How to find out: `srun --mpi=list` lists the plugins, `ompi_info | grep -i pmix`
# shows an Open MPI's PMIx support, `srun --mpi=X -n 2 python -m mpips.doctor` must say "2 rank(s)".
#
# Needs `python` with mpi4py on PATH (source jobs/env.sh first) and srun. Says on stderr what it
# chose and why.
set -euo pipefail

say() { printf 'mpips: srun %s\n' "$*" >&2; }

case "${MPIPS_SRUN_MPI:-}" in
    default) say "without --mpi: the site's MpiDefault (MPIPS_SRUN_MPI=default)"; exit 0 ;;
    ?*) say "--mpi=$MPIPS_SRUN_MPI (MPIPS_SRUN_MPI)"; echo "$MPIPS_SRUN_MPI"; exit 0 ;;
esac

# the MPI library mpi4py loads (without initialising it: a batch script is no MPI process)
vendor=$(python -c 'import mpi4py
mpi4py.rc.initialize = False
from mpi4py import MPI
name, version = MPI.get_vendor()
print(name, ".".join(map(str, version)))') || { say "cannot tell the MPI: python cannot import mpi4py (source jobs/env.sh)"; exit 1; }
plugins=$(srun --mpi=list 2>&1 | sed -n 's/^[[:space:]]\{1,\}\([a-z0-9_]\{1,\}\)$/\1/p' | xargs)

case "$vendor" in
    "Open MPI"*)
        for want in pmix pmi2; do
            case " $plugins " in
                *" $want "*) say "--mpi=$want ($vendor; this srun has: $plugins; MPIPS_SRUN_MPI overrides)"
                             echo "$want"; exit 0 ;;
            esac
        done
        say "without --mpi: $vendor needs pmix or pmi2, and this srun lists neither (${plugins:-none}):" \
            "tasks may fail in MPI_Init; use mpirun inside the allocation, or set MPIPS_SRUN_MPI"
        ;;
    *) say "without --mpi: the site's MpiDefault for $vendor (MPIPS_SRUN_MPI=pmi2 or pmix overrides)" ;;
esac

# shellcheck shell=bash
# Environment for running mpips from this checkout.  Source it, do not run it:
#
#   source jobs/env.sh          # then: mpirun -n 4 python -m mpips.train ...
#
# - puts the project's virtual environment (VENV, default .venv) first on PATH;
# - OMP_NUM_THREADS=1 unless already set: every rank is a process, and a torch thread pool per rank
#   on a shared node oversubscribes the cores many times over;
# - with Open MPI only (MPICH and others need none of this):
#     OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1  when running as root (containers, CI); mpirun refuses otherwise
#     oversubscribe=1                     allow more ranks than cores (laptops, CI, a 2-core box)
#     mpi_yield_when_idle=1               waiting ranks yield the core instead of spinning on it,
#                                         which matters as soon as ranks outnumber cores
# Every variable that is already set is left as the caller set it.
# Safe under `set -euo pipefail`; needs bash (BASH_SOURCE).

_mpips_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_mpips_venv=${VENV:-$_mpips_root/.venv}
case "$PATH" in
    "$_mpips_venv/bin:"*) ;;
    *) export PATH="$_mpips_venv/bin:$PATH" ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

_mpips_ompi_version=$( (mpirun --version 2>/dev/null || true) | sed -n 's/.*(Open MPI) \([0-9][0-9]*\).*/\1/p' | head -n 1)
if [ -n "$_mpips_ompi_version" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
        export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
    fi
    export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
    if [ "$_mpips_ompi_version" -ge 5 ]; then
        # Open MPI 5 launches through PRRTE, which reads its own variable for the mapping policy.
        export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}
    else
        export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
    fi
fi
unset _mpips_root _mpips_venv _mpips_ompi_version

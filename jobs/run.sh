#!/usr/bin/env bash
# Train with mpips on this machine (after `bash jobs/setup.sh`):
#
#   bash jobs/run.sh                          # the default job: 4 ranks, MLP on UCI digits
#   NP=6 bash jobs/run.sh --servers 2         # any `python -m mpips.train --help` flags
#   MPIPS_TIMEOUT=3600 bash jobs/run.sh ...   # wall-clock limit in seconds (default 900)
#   MPIRUN=/opt/mpi/bin/mpirun bash jobs/run.sh  # this launcher (default: the one of mpi4py's MPI)
#
# Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGHUP to this script stop the job at its next step
# boundary, every rank: with --checkpoint-dir it writes a checkpoint there and this script exits
# 75 (run again with --resume); without, it stops cleanly (the model saved if --save is given)
# and exits 128 + the signal (143 for SIGTERM, 130 for Ctrl-C). The wall-clock limit does the
# same. It works by sending SIGUSR1 to mpirun, which Open MPI forwards to every rank and then
# waits for them; SIGTERM or Ctrl-C sent to mpirun itself would kill the ranks 1 s later
# (odls_base_sigkill_timeout), too soon for most checkpoints. The README's "Failures and
# recovery" has the table.
#
# On a cluster use `sbatch jobs/slurm/train.sbatch` (or srun) instead.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/jobs/env.sh"

limit=${MPIPS_TIMEOUT:-900}
grace=${MPIPS_STOP_GRACE:-120}  # seconds from the stop request to a hard kill of the job
# The launcher of the MPI that mpi4py was built for: Debian's plain `mpirun` is whichever MPI
# update-alternatives picked, and under another MPI's launcher every rank runs alone.
mpirun=${MPIRUN:-$(python -m mpips.doctor --launcher || echo mpirun)}
set -m  # job control: mpirun gets its own process group, so Ctrl-C reaches this script, not mpirun
"$mpirun" -n "${NP:-4}" python -m mpips.train "$@" &
job=$!
set +m

helpers=()
after() {  # after SECONDS COMMAND...: run COMMAND in the background after SECONDS, unless ended first
    local seconds=$1
    shift
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "$seconds" &
        nap=$!
        wait "$nap" && "$@"
    ) >/dev/null 2>&1 &
    helpers+=($!)
}

signalled=""
stop_job() {  # $1: what asked for the stop; the job stops at its next step boundary
    [ -n "$signalled" ] && return
    signalled=$1
    echo "jobs/run.sh: $1: stopping the job at its next step (SIGUSR1 to mpirun)" >&2
    kill -USR1 "$job" 2>/dev/null
    after "$grace" kill -KILL -- "-$job"
}
trap 'stop_job SIGTERM' TERM
trap 'stop_job SIGINT' INT
trap 'stop_job SIGHUP' HUP
after "$limit" kill -USR1 "$$"
trap 'stop_job "the wall-clock limit of ${limit} s (MPIPS_TIMEOUT)"' USR1

rc=0
while :; do  # a trapped signal interrupts `wait`: wait again until mpirun has ended
    wait "$job"
    rc=$?
    kill -0 "$job" 2>/dev/null || break
done
kill "${helpers[@]}" 2>/dev/null  # the timers (they hold no pipe of the caller's open)
case "$signalled:$rc" in
    :*) ;;
    *:75) ;;  # checkpointed: requeue and run again with --resume
    SIGTERM:*) rc=143 ;;
    SIGINT:*) rc=130 ;;
    SIGHUP:*) rc=129 ;;
    *) rc=124 ;;  # the wall-clock limit, no checkpoint
esac
exit "$rc"

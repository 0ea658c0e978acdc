#!/usr/bin/env bash
# The whole test suite, as CI runs it (after `bash jobs/setup.sh`):
#
#   bash jobs/test.sh                   # lint, unit + end-to-end, mpi tests at 1, 2, 4, 6 ranks, Slurm, docs
#   bash jobs/test.sh -x -k transport   # extra arguments go to every pytest run
#   MPIPS_TEST_SIZES="2 4" bash jobs/test.sh
#
# Stage 1 runs the tests not marked `mpi` or `slurm` with plain pytest; end-to-end tests start
# their own mpirun (tests/helpers.py). Then, for each world size K, `mpirun -n K pytest --with-mpi`
# runs the tests marked `mpi` whose sizes include K (MPIPS_EXACT_SIZE=1, see tests/conftest.py), so
# no test runs twice. Last, the tests marked `slurm` run the job scripts of jobs/slurm/ on a
# private Slurm that they start (jobs/slurm-local.sh: needs root; installs the Slurm packages when
# missing); MPIPS_SLURM_TESTS=0 leaves that stage out, and the summary says so. Each stage has a
# wall-clock limit; a failing rank aborts its stage at once. Every stage runs even after a
# failure; the exit status is 1 if any failed. The last stage builds the docs (Sphinx, warnings as
# errors) into a temporary folder.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/jobs/env.sh"
cd "$here" || exit 1

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

summary=()
failed=0
# stage NAME LIMIT_S COMMAND...: run COMMAND under a time limit, show its output, record the result.
stage() {
    local name=$1 limit=$2 start rc result last
    shift 2
    printf '\n=== %s\n    %s\n' "$name" "$*"
    start=$(now)
    # --foreground: Ctrl-C reaches mpirun; on expiry mpirun gets SIGTERM and ends its ranks.
    timeout --foreground --kill-after=30 "$limit" "$@" 2>&1 | tee "$logs/stage.log"
    rc=${PIPESTATUS[0]}
    last=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/stage.log" | grep -aE ' in [0-9.]+s' | tail -n 1 | tr -d '=' \
        | sed 's/^ *//; s/ *$//')
    case $rc in
        0) result="passed" ;;
        5) result="no tests selected" ;;  # pytest: nothing selected (at this size), not a failure
        124) result="FAILED: timed out after ${limit} s"; failed=1 ;;
        *) result="FAILED (exit status $rc)"; failed=1 ;;
    esac
    summary+=("$(printf '%-34s %-32s %7s s   %s' "$name" "$result" "$(seconds_since "$start")" "$last")")
}

total_start=$(now)
stage "lint (ruff)" 120 ruff check mpips tests examples docs
stage "unit + end-to-end (plain pytest)" 1800 \
    python -m pytest -q -p no:cacheprovider -m "not mpi and not slurm" "$@"
for k in ${MPIPS_TEST_SIZES:-1 2 4 6}; do
    stage "mpi tests, $k rank(s)" 600 env MPIPS_EXACT_SIZE=1 \
        mpirun -n "$k" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi "$@"
done
if [ "${MPIPS_SLURM_TESTS:-1}" = 0 ]; then
    summary+=("$(printf '%-34s %s' "job scripts on a private Slurm" "not run (MPIPS_SLURM_TESTS=0)")")
else
    # The daemons live in $logs/slurm; stopped by the tests, and here again in case pytest was
    # killed before its fixture could stop them (a timeout).
    stage "job scripts on a private Slurm" 600 env MPIPS_SLURM_DIR="$logs/slurm" \
        python -m pytest -q -p no:cacheprovider -m slurm -o faulthandler_timeout=590 "$@"
    [ -f "$logs/slurm/slurm.conf" ] && bash "$here/jobs/slurm-local.sh" stop "$logs/slurm" 2>/dev/null
fi

stage "docs (sphinx -W)" 300 bash docs/build.sh "$logs/docs"

printf '\n=== summary\n'
printf '%s\n' "${summary[@]}"
printf '%-34s %-32s %7s s\n' "total" "$([ $failed -eq 0 ] && echo passed || echo FAILED)" \
    "$(seconds_since "$total_start")"
exit $failed

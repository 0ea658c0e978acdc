#!/usr/bin/env bash
# A throwaway one-node Slurm on this machine, to run the job scripts of jobs/slurm/ against a real
# Slurm: the test suite starts one (tests/test_slurm.py), and you can by hand. As root:
#
#   bash jobs/slurm-local.sh start DIR   # install slurmctld slurmd slurm-client munge when missing,
#                                        # write DIR/slurm.conf, start munged, slurmctld and slurmd
#   export SLURM_CONF=DIR/slurm.conf     # sbatch, srun, squeue, scontrol now talk to it
#   sbatch --ntasks=4 jobs/slurm/train.sbatch --steps 200
#   bash jobs/slurm-local.sh stop DIR    # cancel its jobs, stop its daemons (also after a failure)
#
# Everything lives in DIR: configuration, state, spool, logs (DIR/log/*.log), pid files, and a
# munge key and socket of its own (munged runs on DIR/munge.socket, so a munged of the system, if
# any, is left alone). Nothing needs systemd. The node is `hostname -s` at 127.0.0.1, on two free
# TCP ports, so several such clusters can run side by side. What makes Slurm 22.05 run jobs here
# without cgroups: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none; with
# SelectType=select/cons_tres and SlurmdParameters=config_overrides the node may declare more CPUs
# than it has (MPIPS_SLURM_CPUS, default 8), so a 2-core machine takes jobs of 4-6 tasks.
# MpiDefault=none, as in Debian's example: the job scripts choose --mpi themselves. Slurm holds a
# requeued job for AuthInfo's cred_expire + 1 s before it may start again (default 120 s, measured
# 132 s here): cred_expire=10 and sched_interval=2 make that 11-12 s, for the tests.
# MPIPS_SLURM_GPUS=N (default 4) declares N GPUs whose device files are links to /dev/null, so
# that jobs asking for --gres=gpu:N are accepted (Slurm sets CUDA_VISIBLE_DEVICES); there is no GPU.
#
# `start` prints `SLURM_CONF=DIR/slurm.conf` and exits 0 once the node takes jobs; otherwise it says
# why, with the tails of the logs, and exits 1. Needs root: slurmd starts jobs as their user.
set -euo pipefail

say() { printf '[slurm-local] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf
# Every daemon started here carries this variable, and so do the slurmstepd it forks: `stop` finds
# them by it, whatever became of the pid files.
marker="MPIPS_SLURM_LOCAL=$dir"

install_packages() {
    local need=() cmd
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null || need=(slurmctld slurmd slurm-client munge)
    done
    [ ${#need[@]} -eq 0 ] && return
    say "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' own daemons must not start: they would need /etc/slurm/slurm.conf (and a failed
    # start can fail the install). Deny service starts for the install, unless a policy is set.
    local policy=/usr/sbin/policy-rc.d ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    local rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
        >"$dir/log/apt.log" 2>&1 || rc=$?
    if [ -n "$ours" ]; then rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || die "apt-get install ${need[*]} failed: $(tail -n 5 "$dir/log/apt.log")"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 20000))
        if port_free "$port" && [ "$port" != "${1:-}" ]; then echo "$port"; return; fi
    done
    die "no free TCP port found in 20000-39999"
}

logs() {  # the last lines of every log, to say why something did not start
    local f
    for f in "$dir"/log/*.log; do
        [ -s "$f" ] && printf -- '--- %s (last 15 lines)\n%s\n' "$f" "$(tail -n 15 "$f")" >&2
    done
    return 0
}

write_conf() {
    local node=$1 ctld_port=$2 slurmd_port=$3 cpus=${MPIPS_SLURM_CPUS:-8} gpus=${MPIPS_SLURM_GPUS:-4}
    local gres=""
    if [ "$gpus" -gt 0 ]; then
        gres=" Gres=gpu:$gpus"
        # Slurm drops a GPU without a File, and wants a character device there
        mkdir -p "$dir/dev"
        for i in $(seq 0 $((gpus - 1))); do ln -sfn /dev/null "$dir/dev/gpu$i"; done
        printf 'NodeName=%s Name=gpu File=%s/dev/gpu[0-%s]\n' "$node" "$dir" $((gpus - 1)) >"$dir/gres.conf"
    fi
    cat >"$conf" <<EOF
# Written by jobs/slurm-local.sh: a throwaway one-node cluster, everything under $dir.
ClusterName=mpipslocal
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=10
SchedulerParameters=sched_interval=2
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
${gres:+GresTypes=gpu}
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN$gres
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

# pids of the processes that carry $marker in their environment (the daemons, slurmstepd)
marked_pids() {
    local file
    grep -lzxF "$marker" /proc/[0-9]*/environ 2>/dev/null | while read -r file; do
        file=${file#/proc/}
        [ "${file%/environ}" = "$$" ] || echo "${file%/environ}"
    done
    return 0
}

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (slurmd starts jobs as their user): sudo bash $0 start $dir"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    chmod 755 "$dir"
    install_packages
    [ -z "$(marked_pids)" ] || die "a Slurm of $dir is running already: bash $0 stop $dir"
    local node ctld_port slurmd_port
    node=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port "$ctld_port")
    export MPIPS_SLURM_LOCAL=$dir SLURM_CONF=$conf

    head -c 1024 /dev/urandom >"$dir/munge.key"
    chmod 400 "$dir/munge.key"
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed" \
        || { logs; die "munged did not start"; }
    munge -n -S "$dir/munge.socket" | unmunge -S "$dir/munge.socket" >/dev/null \
        || { logs; die "munged started but does not answer on $dir/munge.socket"; }

    write_conf "$node" "$ctld_port" "$slurmd_port"
    slurmctld -f "$conf" || { logs; die "slurmctld did not start"; }
    slurmd -f "$conf" || { logs; die "slurmd did not start"; }
    local state=""
    for _ in $(seq 60); do  # 30 s for the node to register and take jobs
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        logs
        die "node $node is '${state:-not reported}' after 30 s, not idle (configuration: $conf)"
    fi
    say "Slurm $(sinfo -V | cut -d' ' -f2) up: node $node ($(sinfo -h -o %c) CPUs), slurmctld on port $ctld_port"
    echo "SLURM_CONF=$conf"
}

stop() {
    [ -f "$conf" ] || { say "no $conf: nothing to stop"; return; }
    export SLURM_CONF=$conf
    local jobs pid left
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        say "cancelling jobs $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 30); do
            [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
    for pidfile in slurmd.pid slurmctld.pid; do
        pid=$(cat "$dir/$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    done
    if [ -S "$dir/munge.socket" ]; then munged --stop --socket="$dir/munge.socket" >/dev/null 2>&1 || true; fi
    for _ in $(seq 20); do  # 10 s for the daemons and any slurmstepd to end, then SIGKILL
        left=$(marked_pids)
        [ -z "$left" ] && break
        sleep 0.5
    done
    if [ -n "$left" ]; then
        say "killing what is left: $(echo "$left" | tr '\n' ' ')"
        # shellcheck disable=SC2086  # one pid per word
        kill -KILL $left 2>/dev/null || true
    fi
    say "stopped (logs in $dir/log)"
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac

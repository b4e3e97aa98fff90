#!/usr/bin/env bash
# A two-node SLURM cluster on 127.0.0.1 with fake GPUs, for the scale-out tests and benchmark.
#
# Why: the slurm backend of scripts/dispatch.py is tested against the real slurmctld/slurmd
# (Debian's packages), not a mock. Both nodes run on this machine; each declares NGPUS GPUs
# whose device files are character devices aliasing /dev/null, so gres/gpu hands out
# CUDA_VISIBLE_DEVICES exactly as on a real cluster. No accounting database (sacct): dispatch.py
# reads a job's end from squeue/scontrol and the exit code its batch script writes.
# Needs root (apt-get, mknod, munged); no systemd, no cgroups.
#
# Usage:
#     sudo bash scripts/cluster/slurm_local.sh up     # install if needed, start, wait until idle
#     export SLURM_CONF=/tmp/autoresearch-slurm/slurm.conf
#     sudo bash scripts/cluster/slurm_local.sh down   # stop exactly the daemons `up` started
# Environment: SLURM_LOCAL_ROOT (default /tmp/autoresearch-slurm), NNODES (2), NGPUS per node (2).
set -euo pipefail
ROOT=${SLURM_LOCAL_ROOT:-/tmp/autoresearch-slurm}
NNODES=${NNODES:-2}
NGPUS=${NGPUS:-2}

up() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
    mkdir -p "$ROOT"/{state,log,dev} /run/munge
    chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    if ! { [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
        runuser -u munge -- /usr/sbin/munged
        touch "$ROOT/started-munged"  # so that `down` stops munged only when `up` started it
    fi
    # gres/gpu needs a File= per GPU or it silently drops the line and drains the node.
    for i in $(seq 0 $((NGPUS - 1))); do
        [ -e "$ROOT/dev/nvidia$i" ] || mknod "$ROOT/dev/nvidia$i" c 1 3
    done
    local host nodes="" node_lines=""
    host=$(hostname -s)
    for n in $(seq 1 "$NNODES"); do
        nodes="$nodes${nodes:+,}n$n"
        mkdir -p "$ROOT/spool/n$n"
        # CPUs above the real count (config_overrides): the GPU, not the CPU, must be what a job waits for.
        node_lines="$node_lines
NodeName=n$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((6818 + n)) CPUs=8 RealMemory=1000 Gres=gpu:$NGPUS State=UNKNOWN"
    done
    cat >"$ROOT/slurm.conf" <<CONF
ClusterName=autoresearch
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.%n.log
SlurmdParameters=config_overrides
# pgid, not linuxproc: linuxproc loses a child whose parent died first (reparented to init), so a
# SIGTERM-ignoring dataloader worker would outlive scancel. Real clusters use proctrack/cgroup.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# scancel: SIGTERM, then SIGKILL this many seconds later (default 30) for children that ignore it
KillWait=5
SchedulerParameters=sched_interval=1
$node_lines
PartitionName=gpu Nodes=$nodes Default=YES MaxTime=120 State=UP
CONF
    echo "NodeName=$nodes Name=gpu File=$ROOT/dev/nvidia[0-$((NGPUS - 1))]" >"$ROOT/gres.conf"
    export SLURM_CONF=$ROOT/slurm.conf
    /usr/sbin/slurmctld -c
    for n in $(seq 1 "$NNODES"); do /usr/sbin/slurmd -N "n$n"; done
    for _ in $(seq 120); do
        [ "$(sinfo -h -t idle -o %D 2>/dev/null)" = "$NNODES" ] && break
        sleep 0.5
    done
    [ "$(sinfo -h -t idle -o %D)" = "$NNODES" ] || { sinfo -N -o "%N %T %E" >&2; echo "slurm_local: nodes did not come up (logs in $ROOT/log)" >&2; exit 1; }
    echo "slurm up: $NNODES nodes x $NGPUS fake GPUs; export SLURM_CONF=$ROOT/slurm.conf"
}

down() {
    local file
    for file in "$ROOT"/slurmd.*.pid "$ROOT/slurmctld.pid"; do
        [ -f "$file" ] && kill "$(cat "$file")" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        local alive=0
        for file in "$ROOT"/slurmd.*.pid "$ROOT/slurmctld.pid"; do
            [ -f "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null && alive=1
        done
        [ $alive = 0 ] && break
        sleep 0.2
    done
    if [ -f "$ROOT/started-munged" ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$ROOT/started-munged"
    fi
    echo "slurm down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

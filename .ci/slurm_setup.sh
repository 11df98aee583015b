#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests/functional/test_slurm.py (CI runs it as root on a
# fresh Debian machine before `uv run pytest`).
#
# Installs Debian's slurm-wlm and munge if missing, writes a minimal slurm.conf for one node named
# after `hostname -s` (its real CPU count, RealMemory a bit below the real value; no cgroups, as
# this runs in a container), creates the munge key, starts munged, slurmctld and slurmd as root,
# and waits until `sinfo` shows the node up (idle, or busy with jobs on a second run). Idempotent:
# daemons already up are left running, unless the config they were started with changed.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
READY_TIMEOUT_S=90

log() { echo "slurm_setup: $*"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own services are not started in a container without systemd; we start the
    # daemons below.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_slurm_conf() {
    local host num_cpus mem_mb real_mem_mb
    host=$(hostname -s)
    num_cpus=$(nproc --all)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Below the real value: slurmd drains a node that reports less memory than configured.
    real_mem_mb=$((mem_mb * 9 / 10))
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
    # Written to a side file first: an unchanged config leaves running daemons alone, a changed
    # one (another CPU count, memory or hostname) restarts them.
    cat >"$SLURM_CONF.new" <<EOF
# Written by .ci/slurm_setup.sh: one local node for the Slurm test.
ClusterName=rltk
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in a container: track processes by parent id, no task binding or accounting.
# (No cgroup.conf either: slurmd's autodetected cgroup plugin is loaded but never used.)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Finished jobs stay visible to scontrol show job (state, exit code) for 10 minutes.
MinJobAge=600
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${num_cpus} RealMemory=${real_mem_mb} State=UNKNOWN
PartitionName=main Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $SLURM_CONF ]] && cmp -s "$SLURM_CONF" "$SLURM_CONF.new"; then
        rm "$SLURM_CONF.new"
    else
        mv "$SLURM_CONF.new" "$SLURM_CONF"
        # A config change only takes effect in daemons started after it.
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
}

daemon_pid() {
    # The pid a Slurm daemon wrote, if that process still runs (pgrep would also match the
    # zombies a daemonizing parent can leave in a container).
    local pid
    pid=$(cat "/run/slurm/$1.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

stop_daemon() {
    local pid
    pid=$(daemon_pid "$1")
    if [[ -n $pid ]]; then
        log "restarting $1 for the new slurm.conf"
        kill "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 "$MUNGE_KEY"
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        su -s /bin/sh munge -c "munged --force"
        munge -n </dev/null | unmunge >/dev/null
    fi
}

start_slurm() {
    if [[ -z $(daemon_pid slurmctld) ]]; then
        log "starting slurmctld"
        slurmctld
    fi
    if [[ -z $(daemon_pid slurmd) ]]; then
        log "starting slurmd"
        slurmd
    fi
}

wait_until_idle() {
    local host state deadline
    host=$(hostname -s)
    deadline=$((SECONDS + READY_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        state=$(sinfo --noheader --nodes="$host" --format=%T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) log "node $host is $state"; return 0 ;;
            down* | drain* | fail*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    log "node $host not idle after ${READY_TIMEOUT_S} s (sinfo: '${state:-no answer}');" \
        "see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd.log"
    return 1
}

install_packages
write_slurm_conf
start_munge
start_slurm
wait_until_idle

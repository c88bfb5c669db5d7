#!/bin/bash
# A one-node SLURM cluster on localhost, for the tests and CI (not for production).
#
#   slurm/local_cluster.sh up   [STATE_DIR]   start munged, slurmctld, slurmd; print `export SLURM_CONF=...`
#   slurm/local_cluster.sh down [STATE_DIR]   cancel its jobs, stop the three daemons by PID, remove STATE_DIR
#
# Needs root and Debian's packages (`apt-get install -y slurm-wlm munge`); works without systemd.
# Everything lives in STATE_DIR (default /tmp/anemia-dist-slurm): its own munge key and socket,
# slurm.conf, spool, logs and PID files, so the machine's own /etc/slurm and munge are untouched.
# munged runs as the munge user and insists that every folder above its socket is searchable by
# all: STATE_DIR must not lie under a private folder (such as pytest's tmp_path).
# Clients find the cluster through SLURM_CONF:   eval "$(slurm/local_cluster.sh up)"
# SLURMCTLD_PORT and SLURMD_PORT (default 6817, 6818) let two clusters run side by side.
set -euo pipefail

STATE=${2:-/tmp/anemia-dist-slurm}
CONF=$STATE/slurm.conf

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

# Wait up to $2 seconds for the command in $1 to succeed.
wait_for() {
    local deadline=$((SECONDS + $2))
    until eval "$1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons and the munge key need it)"
    for binary in munged slurmctld slurmd sbatch scontrol; do
        command -v "$binary" >/dev/null || die "$binary not found: apt-get install -y slurm-wlm munge"
    done
    [[ ! -e $STATE/munge/munged.pid ]] || die "$STATE already holds a cluster; run '$0 down $STATE' first"
    local host
    host=$(hostname -s)
    mkdir -p "$STATE"/{munge,spool/ctld,spool/d,log}

    # munge: a private key and socket. munged refuses a socket directory that others cannot enter
    # or can write to.
    chmod 0755 "$STATE"
    chown munge:munge "$STATE/munge"
    chmod 0755 "$STATE/munge"
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$STATE/munge/munge.key"
    chmod 0400 "$STATE/munge/munge.key"
    runuser -u munge -- munged \
        --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
        --log-file="$STATE/munge/munged.log"
    wait_for "[[ -s $STATE/munge/munged.pid ]]" 10 || die "munged did not start; see $STATE/munge/munged.log"

    # CPUs, sockets and memory exactly as slurmd sees them, else the node is drained.
    local node_line
    node_line=$(slurmd -C | head -n 1)
    cat >"$CONF" <<EOF
ClusterName=anemia-dist-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after 5 s instead of the default 120 s.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
SchedulerParameters=bf_interval=1
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd, no cgroups: plain process tracking, no task binding, no accounting (poll scontrol).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    wait_for "scontrol ping | grep -q UP" 20 || die "slurmctld did not answer; see $STATE/log/slurmctld.log, then run '$0 down $STATE'"
    slurmd -f "$CONF"
    wait_for "sinfo -h -N -o %t | grep -qx idle" 30 || die "node $host not idle; see $STATE/log/slurmd.log, then run '$0 down $STATE'"
    echo "local_cluster.sh: node $host idle (state in $STATE)" >&2
    echo "export SLURM_CONF=$CONF"
}

# Signal the PID in file $1 with SIGTERM and wait for it to exit.
stop_pid_file() {
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    if kill -TERM "$pid" 2>/dev/null; then
        wait_for "! kill -0 $pid" 20 || { echo "local_cluster.sh: killing $pid" >&2; kill -KILL "$pid" 2>/dev/null || true; }
    fi
    rm -f "$file"
}

down() {
    [[ -d $STATE ]] || { echo "local_cluster.sh: nothing at $STATE" >&2; return 0; }
    if [[ -s $STATE/slurmctld.pid ]]; then
        export SLURM_CONF=$CONF
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            wait_for "[[ -z \$(squeue -h -o %i) ]]" 30 || echo "local_cluster.sh: jobs still listed: $jobs" >&2
        fi
    fi
    stop_pid_file "$STATE/slurmd.pid"
    stop_pid_file "$STATE/slurmctld.pid"
    stop_pid_file "$STATE/munge/munged.pid"
    rm -rf "$STATE"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) die "usage: $0 up|down [STATE_DIR]" ;;
esac

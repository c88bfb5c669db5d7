#!/bin/bash
# A SLURM cluster on this machine, for the tests and CI (not for production).
#
#   slurm/local_cluster.sh up [--nodes N] [STATE_DIR]   start munged, slurmctld and the node(s); print `export SLURM_CONF=...`
#   slurm/local_cluster.sh down [STATE_DIR]             cancel its jobs, stop its daemons by PID, remove all it made
#
# Needs root and Debian's packages (`apt-get install -y slurm-wlm munge iproute2`); works without systemd.
# Everything lives in STATE_DIR (default /tmp/anemia-dist-slurm): its own munge key and socket,
# slurm.conf, spool, logs and PID files, so the machine's own /etc/slurm and munge are untouched.
# munged runs as the munge user and insists that every folder above its socket is searchable by
# all: STATE_DIR must not lie under a private folder (such as pytest's tmp_path).
# Clients find the cluster through SLURM_CONF:   eval "$(slurm/local_cluster.sh up)"
# SLURMCTLD_PORT and SLURMD_PORT (default 6817, 6818) let two clusters run side by side.
#
# Without --nodes: one node, slurmd on localhost (NodeName `hostname -s`, NodeAddr 127.0.0.1).
# With --nodes N (N >= 2): nodes node1..nodeN, each a network namespace of its own with its own
# address, so that jobs spanning nodes talk over real addresses as on a cluster, never over
# loopback. A bridge on the host (slurmctld listens on its address) joins the namespaces through
# one veth pair each; inside node I the interface is veth-nodeI. Each node runs its own slurmd,
# started with `nsenter --net` (`ip netns exec` remounts /sys, and slurmd then finds no cgroup
# file system). The names (namespaces anemia-dist-ID-nodeI, bridge adbrID, host-side veths adIDnI)
# derive from STATE_DIR's path, and the /24 (10.x.y.0) is chosen not to overlap any route on the
# machine (chosen under the lock file /run/lock/anemia-dist-local-cluster.lock, which all such
# clusters share), so clusters in different STATE_DIRs run side by side; STATE_DIR/network.env
# records them. Nothing else on the network is touched: no route, no firewall rule, no /etc/hosts.
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

NODES=
case ${1:-} in
    up)
        COMMAND=up
        shift
        if [[ ${1:-} == --nodes ]]; then
            if ! [[ ${2:-} =~ ^[0-9]+$ ]] || ((${2} < 1 || ${2} > 50)); then
                die "--nodes takes a number from 1 to 50"
            fi
            ((${2} > 1)) && NODES=$2
            shift 2
        fi
        ;;
    down)
        COMMAND=down
        shift
        ;;
    *) die "usage: $0 up [--nodes N] [STATE_DIR] | down [STATE_DIR]" ;;
esac
(($# <= 1)) || die "usage: $0 up [--nodes N] [STATE_DIR] | down [STATE_DIR]"
STATE=${1:-/tmp/anemia-dist-slurm}
CONF=$STATE/slurm.conf

# Names of this STATE_DIR's network objects (interface names have at most 15 characters).
ID=$(realpath -m "$STATE" | sha1sum | cut -c1-6)
NAMESPACE_PREFIX=anemia-dist-$ID-
BRIDGE=adbr$ID
LOCK=/run/lock/anemia-dist-local-cluster.lock

# Wait up to $2 seconds for the command in $1 to succeed.
wait_for() {
    local deadline=$((SECONDS + $2))
    until eval "$1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

ip_to_int() {
    local IFS=.
    # shellcheck disable=SC2086  # split on the dots
    set -- $1
    echo $((($1 << 24) | ($2 << 16) | ($3 << 8) | $4))
}

# Whether the /24 starting at address number $1 overlaps a destination of any route on this host.
subnet_in_use() {
    local start=$1 kind destination prefix length mask
    while read -r kind destination _; do
        case $kind in
            local | broadcast | unicast | multicast | anycast | blackhole | unreachable | prohibit | throw | nat) ;;
            *) destination=$kind ;;
        esac
        [[ $destination == default ]] && continue
        [[ $destination == */* ]] || destination=$destination/32
        prefix=$(ip_to_int "${destination%/*}") length=${destination#*/}
        ((length > 24)) && length=24 # compare on the shorter of the two prefixes
        mask=$(((0xffffffff << (32 - length)) & 0xffffffff))
        (((prefix & mask) == (start & mask))) && return 0
    done < <(ip -4 route show table all)
    return 1
}

# A private /24 for the nodes, derived from ID, moved on while it overlaps a route. Prints "10.A.B".
choose_subnet() {
    local a=$((16#${ID:0:2})) b=$((16#${ID:2:2})) tries
    for ((tries = 0; tries < 256; tries++)); do
        subnet_in_use "$(ip_to_int "10.$a.$b.0")" || { echo "10.$a.$b"; return 0; }
        b=$(((b + 1) % 256))
    done
    return 1
}

# The bridge and N namespaces, each joined to it by a veth pair; writes STATE/network.env.
make_network() {
    local subnet i namespace
    exec 9>"$LOCK"
    flock 9 # two clusters starting at once must not pick the same /24
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || die "bridge $BRIDGE exists already: run '$0 down $STATE' first"
    subnet=$(choose_subnet) || die "no free 10.x.y.0/24 found for the nodes; see 'ip route'"
    {
        echo "SUBNET=$subnet.0/24"
        echo "BRIDGE=$BRIDGE"
        echo "HEAD_ADDR=$subnet.1"
        for ((i = 1; i <= NODES; i++)); do echo "NODE${i}_ADDR=$subnet.$((10 + i))"; done
    } >"$STATE/network.env"
    ip link add "$BRIDGE" type bridge
    ip addr add "$subnet.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    flock -u 9
    for ((i = 1; i <= NODES; i++)); do
        namespace=$NAMESPACE_PREFIX"node$i"
        ip netns add "$namespace"
        ip link add "ad${ID}n$i" type veth peer name "veth-node$i" netns "$namespace"
        ip link set "ad${ID}n$i" master "$BRIDGE" up
        ip -n "$namespace" addr add "$subnet.$((10 + i))/24" dev "veth-node$i"
        ip -n "$namespace" link set "veth-node$i" up
        ip -n "$namespace" link set lo up
    done
    echo "$subnet"
}

up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons and the munge key need it)"
    for binary in munged slurmctld slurmd sbatch scontrol; do
        command -v "$binary" >/dev/null || die "$binary not found: apt-get install -y slurm-wlm munge"
    done
    if [[ -n $NODES ]]; then
        for binary in ip nsenter flock; do
            command -v "$binary" >/dev/null || die "$binary not found: apt-get install -y iproute2 util-linux"
        done
    fi
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
    local node_line controller_addr=127.0.0.1 nodes_conf partition=$host subnet i
    node_line=$(slurmd -C | head -n 1)
    nodes_conf="SlurmdSpoolDir=$STATE/spool/d
SlurmdPidFile=$STATE/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN"
    if [[ -n $NODES ]]; then
        subnet=$(make_network)
        controller_addr=$subnet.1
        partition="node[1-$NODES]"
        # Every node claims the whole machine; they share it.
        nodes_conf="SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log"
        for ((i = 1; i <= NODES; i++)); do
            mkdir -p "$STATE/spool/node$i"
            nodes_conf+="
NodeName=node$i NodeAddr=$subnet.$((10 + i)) NodeHostname=$host ${node_line#NodeName=* } State=UNKNOWN"
        done
    fi
    cat >"$CONF" <<EOF
ClusterName=anemia-dist-local
SlurmctldHost=$host($controller_addr)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after 5 s instead of the default 120 s, and the
# scheduler looks every second (default 60 s) for jobs that became eligible, so it does within ~7 s.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$STATE/spool/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
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
$nodes_conf
PartitionName=debug Nodes=$partition Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    wait_for "scontrol ping | grep -q UP" 20 || die "slurmctld did not answer; see $STATE/log/slurmctld.log, then run '$0 down $STATE'"
    if [[ -z $NODES ]]; then
        slurmd -f "$CONF"
        wait_for "sinfo -h -N -o %t | grep -qx idle" 30 || die "node $host not idle; see $STATE/log/slurmd.log, then run '$0 down $STATE'"
        echo "local_cluster.sh: node $host idle (state in $STATE)" >&2
    else
        for ((i = 1; i <= NODES; i++)); do
            nsenter --net="/var/run/netns/${NAMESPACE_PREFIX}node$i" slurmd -f "$CONF" -N "node$i"
        done
        wait_for "[[ \$(sinfo -h -N -o %t | grep -cx idle) -eq $NODES ]]" 30 ||
            die "not all $NODES nodes idle: $(sinfo -h -N -o '%N %t' | tr '\n' ' '); see $STATE/log/slurmd-node*.log, then run '$0 down $STATE'"
        echo "local_cluster.sh: nodes node[1-$NODES] idle on $subnet.0/24, controller $subnet.1 (state in $STATE)" >&2
    fi
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

# Remove this cluster's namespaces (ending what still runs inside them: only this cluster's jobs
# and daemons can be there), their veths and the bridge. Found by name, so this also cleans up
# after an `up` that failed half-way.
remove_network() {
    local namespace pids
    command -v ip >/dev/null || return 0
    for namespace in $(ip netns list | awk -v p="$NAMESPACE_PREFIX" 'index($1, p) == 1 {print $1}'); do
        pids=$(ip netns pids "$namespace" || true)
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            wait_for "[[ -z \$(ip netns pids $namespace) ]]" 10 || {
                # shellcheck disable=SC2046
                kill -KILL $(ip netns pids "$namespace") 2>/dev/null || true
            }
        fi
        ip netns del "$namespace"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

down() {
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
    local file
    for file in "$STATE"/slurmd*.pid; do
        stop_pid_file "$file"
    done
    remove_network
    [[ -d $STATE ]] || { echo "local_cluster.sh: nothing at $STATE" >&2; return 0; }
    stop_pid_file "$STATE/slurmctld.pid"
    stop_pid_file "$STATE/munge/munged.pid"
    rm -rf "$STATE"
}

$COMMAND

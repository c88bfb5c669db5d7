#!/bin/bash
# One node's part of a job: `accelerate launch "$@"`, with SIGUSR1 turned into a checkpoint.
#
# On SIGUSR1 this script passes the signal to the training ranks (the launcher's children),
# which save a checkpoint and exit with PREEMPTED_EXIT_CODE. The launcher itself must survive:
# Python dies of an unhandled SIGUSR1, and `srun` signals every process of the step, so the
# launcher starts with SIGUSR1 ignored (an ignored signal stays ignored across exec; the ranks
# install their own handler). torchrun reports a rank's exit 75 as its own exit 1, so a failure
# after the signal is reported as PREEMPTED_EXIT_CODE.
#
# Several machines (--num_machines N > 1 with --machine_rank and --main_process_ip on the command
# line; also usable without SLURM, one call per machine), before launching:
# - GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, unless already set, become the interface this node
#   reaches the main process address through (on machine rank 0: the interface holding it).
#   Unset, gloo binds to the address the host name resolves to, which is a loopback address on
#   Debian (127.0.1.1) and in network namespaces, and the other nodes cannot connect to it.
# - Machine rank 0 checks that the main process address is its own; the others wait until its
#   port answers. Either stops with a message naming the address after RENDEZVOUS_TIMEOUT
#   seconds (default 300) at most, and `--rdzv_conf timeout=RENDEZVOUS_TIMEOUT` (unless given)
#   makes the rendezvous itself give up then, so a node that cannot join fails on every node
#   instead of leaving the others waiting.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The value of launcher option $1 among the arguments that follow (`--name VALUE` or `--name=VALUE`).
option_value() {
    local name=$1
    shift
    while (($#)); do
        case $1 in
            "$name") echo "${2:-}"; return ;;
            "$name"=*) echo "${1#*=}"; return ;;
        esac
        shift
    done
}

node=${SLURMD_NODENAME:-$(hostname -s)}
rendezvous=()
machines=$(option_value --num_machines "$@")
if ((${machines:-1} > 1)); then
    rank=$(option_value --machine_rank "$@")
    main=$(option_value --main_process_ip "$@")
    port=$(option_value --main_process_port "$@")
    port=${port:-29500}
    timeout=${RENDEZVOUS_TIMEOUT:-300}
    fail() { echo "node_launch.sh: $node (machine rank ${rank:-?}): $*" >&2; exit 1; }
    [[ -n $rank && -n $main ]] || fail "--num_machines $machines needs --machine_rank and --main_process_ip"
    command -v ip >/dev/null || fail "the 'ip' command (iproute2) is needed to find this node's network interface"
    main_ip=$(ipv4_of "$main")
    [[ -n $main_ip ]] || fail "the main process address '$main' does not resolve here"
    interface=$(interface_towards "$main_ip")
    if [[ -z $interface || $interface == lo ]]; then
        [[ -n ${GLOO_SOCKET_IFNAME:-} ]] ||
            fail "cannot tell which interface the other nodes reach this one on from '$main' ($main_ip):" \
                "pass the main node's network address as --main_process_ip, or set GLOO_SOCKET_IFNAME"
    else
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$interface} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$interface}
    fi
    echo "== $node machine rank $rank: rendezvous $main_ip:$port, GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME" \
        "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-}"
    if ((rank == 0)); then
        [[ $(ip -o route get "$main_ip") == local\ * ]] ||
            fail "machine rank 0 hosts the rendezvous, but $main ($main_ip) is not an address of this node"
    else
        deadline=$((SECONDS + timeout))
        until timeout 5 bash -c "exec 3<>/dev/tcp/$main_ip/$port" 2>/dev/null; do
            ((SECONDS < deadline)) ||
                fail "could not reach the rendezvous at $main_ip:$port within ${timeout}s (through $interface):" \
                    "is machine rank 0 running, are the main process address and port right, is the port open?"
            sleep 1
        done
    fi
    [[ -n $(option_value --rdzv_conf "$@") ]] || rendezvous=(--rdzv_conf "timeout=$timeout")
fi

preempted=0
trap '' USR1
accelerate launch "${rendezvous[@]}" "$@" &
launcher=$!
trap 'preempted=1; pkill -USR1 -P "$launcher" || true' USR1
wait_for_exit "$launcher"
status=$?
if ((status == PREEMPTED_EXIT_CODE || (preempted && status != 0))); then
    exit "$PREEMPTED_EXIT_CODE"
fi
if ((status != 0 && ${machines:-1} > 1)); then
    echo "node_launch.sh: $node (machine rank $rank): accelerate launch exited with status $status" \
        "(rendezvous $main_ip:$port, interface ${GLOO_SOCKET_IFNAME:-?})" >&2
fi
exit "$status"

# shellcheck shell=bash
# Shared by the SLURM scripts (sourced, not run).

# Exit status of a training that saved a checkpoint on a preemption signal; the batch scripts
# requeue the job on it. Must equal anemia_dist.preemption.PREEMPTED_EXIT_CODE.
PREEMPTED_EXIT_CODE=75

# The `accelerate launch` arguments for one node's processes, into the array `launch`:
# CPU_PROCESSES=N CPU processes (tests, CI), else one process per GPU of the job.
single_node_launch_args() {
    if [[ -n ${CPU_PROCESSES:-} ]]; then
        export ACCELERATE_USE_CPU=true # see accelerate_configs/cpu_2proc.yaml
        launch=(--config_file accelerate_configs/cpu_2proc.yaml --num_processes "$CPU_PROCESSES")
    elif ((${SLURM_GPUS_ON_NODE:-0} == 1)); then
        launch=(--config_file accelerate_configs/single_gpu.yaml)
    elif ((${SLURM_GPUS_ON_NODE:-0} > 1)); then
        launch=(--config_file "${ACCELERATE_CONFIG:-accelerate_configs/multi_gpu_bf16.yaml}" --num_processes "$SLURM_GPUS_ON_NODE")
    else
        echo "no GPUs in this job: request them (sbatch --gres=gpu:N) or set CPU_PROCESSES=N" >&2
        exit 2
    fi
}

# Wait until process $1 has exited and return its status. A trapped signal interrupts `wait`
# early, so wait again while the process lives; bash keeps the status for the final `wait`.
wait_for_exit() {
    local pid=$1
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    wait "$pid"
}

# Run "$@" in the background, pass a SIGUSR1 sent to this shell on to it, return its status.
# A batch shell only runs traps between commands, so the work must not run in the foreground.
run_relaying_usr1() {
    "$@" &
    local child=$!
    # shellcheck disable=SC2064  # the PID is fixed now
    trap "kill -USR1 $child 2>/dev/null || true" USR1
    wait_for_exit "$child"
}

# The file the training's main process writes, once the preemption checkpoint is complete, for
# the `anemia-dist train` arguments "$@": RUN/preempted.json, resolved by the package's own config
# loader (only that: the CLI module would import torch, seconds on a busy node).
preemption_marker() {
    python - "$@" <<'EOF'
import argparse
import sys
from pathlib import Path

from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError
from anemia_dist.run_dir import PREEMPTED

parser = argparse.ArgumentParser(prog="anemia-dist train")
parser.add_argument("--config")
args, overrides = parser.parse_known_args(sys.argv[1:])
try:
    cfg = load_config(args.config, overrides)
except ConfigError as error:
    sys.exit(f"anemia-dist train: error: {error}")
print(Path(cfg.run.output_dir) / cfg.run.name / PREEMPTED)
EOF
}

# Requeue this job when the training stopped for a preemption; otherwise pass its status on.
# $1 is the training's status, $2 the preemption marker, removed before the training started.
# The marker decides: on several nodes srun's status does not tell a preemption (the first node
# to exit 75 is a "bad exit", srun terminates the others and returns a signal's status). A
# status of 75 without a marker (a signal that reached the ranks before their handlers) still
# requeues: the job is about to be stopped, and the next start resumes from the last checkpoint.
finish_or_requeue() {
    local status=$1 marker=${2:-} job=$SLURM_JOB_ID
    # In an array SLURM_JOB_ID of one task can be the array's own id, which requeues every task.
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    fi
    if ((status != 0)) && { ((status == PREEMPTED_EXIT_CODE)) || [[ -n $marker && -f $marker ]]; }; then
        echo "== $(date -Is) checkpoint saved after the preemption signal (training status $status): requeueing job $job"
        scontrol requeue "$job"
        exit "$PREEMPTED_EXIT_CODE"
    fi
    echo "== $(date -Is) training exited with status $status"
    exit "$status"
}

# The IPv4 address host name or address $1 stands for on this node.
ipv4_of() {
    getent ahostsv4 "$1" | awk 'NR == 1 {print $1}'
}

# The network interface this node reaches IPv4 address $1 through; for one of its own
# addresses, the interface that holds it. Prints nothing if there is no route.
interface_towards() {
    local route
    route=$(ip -o route get "$1" 2>/dev/null) || return 0
    if [[ $route == local\ * ]]; then
        ip -o -4 addr show | awk -v addr="$1" '{sub("/.*", "", $4)} $4 == addr {print $2; exit}'
    else
        sed -n 's/.* dev \([^ ]*\).*/\1/p' <<<"$route"
    fi
}

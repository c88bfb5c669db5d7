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

# Requeue this job when the training stopped for a preemption; otherwise pass its status on.
finish_or_requeue() {
    local status=$1
    if ((status == PREEMPTED_EXIT_CODE)); then
        echo "== $(date -Is) checkpoint saved after the preemption signal: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "== $(date -Is) training exited with status $status"
    fi
    exit "$status"
}

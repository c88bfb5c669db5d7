#!/bin/bash
# One node's part of a job: `accelerate launch "$@"`, with SIGUSR1 turned into a checkpoint.
#
# On SIGUSR1 this script passes the signal to the training ranks (the launcher's children),
# which save a checkpoint and exit with PREEMPTED_EXIT_CODE. The launcher itself must survive:
# Python dies of an unhandled SIGUSR1, and `srun` signals every process of the step, so the
# launcher starts with SIGUSR1 ignored (an ignored signal stays ignored across exec; the ranks
# install their own handler). torchrun reports a rank's exit 75 as its own exit 1, so a failure
# after the signal is reported as PREEMPTED_EXIT_CODE.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

preempted=0
trap '' USR1
accelerate launch "$@" &
launcher=$!
trap 'preempted=1; pkill -USR1 -P "$launcher" || true' USR1
wait_for_exit "$launcher"
status=$?
if ((status == PREEMPTED_EXIT_CODE || (preempted && status != 0))); then
    exit "$PREEMPTED_EXIT_CODE"
fi
exit "$status"

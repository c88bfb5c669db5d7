"""The preemption watcher alone on N ranks: where the ranks stop, and what it costs per step.

Usage, under ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N``:
``watcher_probe.py STEPS [--signal RANK:STEP] [--blocking] [--work-ms MS]``. Each step stands in
for a training step: MS milliseconds of matrix products, then an all-reduce of a gradient-sized
tensor (DDP's, which lines the ranks up again), then the watcher's check (``step_agreed``, or
``--blocking``: ``agreed``, a blocking all-reduce, what every step did before). ``--signal``
sends SIGUSR1 to one rank inside its given step. Each rank prints one JSON line: the step it
stopped after (or STEPS) and the mean seconds per step spent in the check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from anemia_dist.preemption import PreemptionWatcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int)
    parser.add_argument("--signal", help="RANK:STEP")
    parser.add_argument("--blocking", action="store_true")
    parser.add_argument("--work-ms", type=float, default=5.0)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    signal_rank, signal_step = map(int, args.signal.split(":")) if args.signal else (-1, -1)
    watcher = PreemptionWatcher(accelerator)
    check = watcher.agreed if args.blocking else watcher.step_agreed
    a, gradient = torch.randn(256, 256), torch.zeros(512 * 1024)
    checking, stopped = 0.0, args.steps
    try:
        for step in range(1, args.steps + 1):
            deadline = time.perf_counter() + args.work_ms / 1000
            while time.perf_counter() < deadline:
                a = torch.tanh(a @ a)
            if (rank, step) == (signal_rank, signal_step):
                os.kill(os.getpid(), signal.SIGUSR1)
            dist.all_reduce(gradient)
            started = time.perf_counter()
            stop = check()
            checking += time.perf_counter() - started
            if stop:
                stopped = step
                break
    finally:
        watcher.restore()
    row = json.dumps({"rank": rank, "stopped_after": stopped, "check_seconds_per_step": checking / stopped})
    # One write per line: the ranks share the launcher's stdout pipe, and print() writes the text and
    # its newline separately, so two ranks' lines could run together.
    os.write(1, (row + "\n").encode())
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

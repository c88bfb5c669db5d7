"""Test hooks inside the training ranks of SLURM jobs, where a test cannot wrap the program.

Python imports this module at start-up when its folder is on PYTHONPATH (the multi-node tests
put it there). It does nothing outside a torchrun worker (``LOCAL_RANK`` unset) or without:

- ``ANEMIA_DIST_TEST_PAUSE=STEP:SECONDS:FILE``: global rank 0 creates FILE at its STEP-th
  optimizer step and sleeps SECONDS there (the other ranks wait for it at the next gradient
  all-reduce), so that a signal sent once FILE appears lands inside that step. Once per run:
  a requeued start, which finds FILE, does not pause.
- ``ANEMIA_DIST_TEST_EXIT_DELAY=NODE:SECONDS``: the ranks of machine rank NODE (torchrun's
  ``GROUP_RANK``) that exit with the preemption status do so SECONDS late: one node's ranks exit
  after the other's, as when a node is slower to tear down.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PREEMPTED_STATUS = 75  # anemia_dist.preemption.PREEMPTED_EXIT_CODE, without importing torch here


def _pause_at_step(step: int, seconds: float, marker: Path) -> None:
    import torch

    real_step = torch.optim.Adam.step
    count = {"steps": 0}

    def paused_step(self, *args, **kwargs):
        count["steps"] += 1
        if count["steps"] == step and not marker.exists():
            marker.touch()
            time.sleep(seconds)
        return real_step(self, *args, **kwargs)

    torch.optim.Adam.step = paused_step


def _delay_preempted_exit(seconds: float) -> None:
    real_exit = sys.exit

    def exit_late(status=None):
        if status == PREEMPTED_STATUS:
            time.sleep(seconds)
        real_exit(status)

    sys.exit = exit_late


if "LOCAL_RANK" in os.environ:
    if pause := os.environ.get("ANEMIA_DIST_TEST_PAUSE"):
        step, seconds, marker = pause.split(":", 2)
        if os.environ.get("RANK") == "0":
            _pause_at_step(int(step), float(seconds), Path(marker))
    if delay := os.environ.get("ANEMIA_DIST_TEST_EXIT_DELAY"):
        node, seconds = delay.split(":")
        if os.environ.get("GROUP_RANK") == node:
            _delay_preempted_exit(float(seconds))

"""Train under ``accelerate launch``; one rank sends itself SIGUSR1 at its N-th optimizer step.

Usage: ``signal_at_step.py RANK N key=value ...``. A deterministic stand-in for a scheduler's
signal that reaches a single rank mid-epoch (timing an outside ``kill`` is racy on fast epochs).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from anemia_dist.cli import main as cli_main


def main() -> None:
    rank, at_step = int(sys.argv[1]), int(sys.argv[2])
    steps = {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == at_step and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(self, *args, **kwargs)

    torch.optim.Adam.step = step
    sys.exit(cli_main(["train", *sys.argv[3:]]))


if __name__ == "__main__":
    main()

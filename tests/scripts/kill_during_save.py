"""Train, and SIGKILL this process in the middle of writing checkpoint number N.

Usage: ``kill_during_save.py N key=value ...``. The model file of that checkpoint is written,
then the process dies as it starts writing the optimizer state: a torn checkpoint on disk.
"""

from __future__ import annotations

import os
import signal
import sys

import accelerate.checkpointing
from accelerate import Accelerator

from anemia_dist.config import load_config
from anemia_dist.trainer import train


def main() -> None:
    kill_at = int(sys.argv[1])
    calls = {"checkpoints": 0}
    real_save_state, real_save = Accelerator.save_state, accelerate.checkpointing.save

    def counting_save_state(self, *args, **kwargs):
        calls["checkpoints"] += 1
        return real_save_state(self, *args, **kwargs)

    def dying_save(obj, path, *args, **kwargs):
        if calls["checkpoints"] == kill_at and "optimizer" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)

    Accelerator.save_state = counting_save_state
    accelerate.checkpointing.save = dying_save
    train(load_config(None, sys.argv[2:]))


if __name__ == "__main__":
    main()

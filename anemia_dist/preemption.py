"""Preemption: a signal on any rank becomes a checkpoint and a documented exit code on all ranks."""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist
from accelerate import Accelerator

PREEMPTED_EXIT_CODE = 75
"""Exit status of ``anemia-dist train`` after a preemption checkpoint (EX_TEMPFAIL). Under
``accelerate launch`` with 2+ processes, torchrun reports a rank's 75 as its own exit 1, so
``slurm/node_launch.sh`` maps "launcher failed after it passed on a USR1" back to 75, and the
run directory also gets a ``preempted.json`` marker naming the checkpoint."""

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is complete."""


class PreemptionWatcher:
    """Signal handlers only set a flag; the ranks agree on it at step boundaries.

    A signal may reach one rank only (``scancel --signal`` to one task, a node's SIGTERM), so
    the decision is one all-reduce of the flags: every rank stops at the same step, none hangs.
    The flag travels over a CPU (gloo) group: on GPUs a per-step NCCL all-reduce read back with
    ``.item()`` would make the host wait for the device every step.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.received: int | None = None
        distributed = accelerator.num_processes > 1
        self._group = dist.new_group(backend="gloo") if distributed and accelerator.device.type != "cpu" else None
        self._flag = torch.zeros(1, dtype=torch.int32) if distributed else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> bool:
        if self._flag is None:
            return self.received is not None
        self._flag.fill_(self.received is not None)
        dist.all_reduce(self._flag, group=self._group)
        return bool(self._flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

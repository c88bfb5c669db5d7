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
    the decision is an all-reduce of the flags: every rank stops at the same step, none hangs.
    Per step nobody waits for it (a blocking all-reduce costs a network round trip per step,
    more with more ranks): ``step_agreed`` starts one and answers with the one it started at
    its previous call, which has long arrived. Every rank reads the same reduction at the same
    step, so all stop together, one step after the signal. ``agreed`` (between epochs) waits.
    The flag travels over a CPU (gloo) group: on GPUs an NCCL all-reduce read back with
    ``.item()`` would make the host wait for the device.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.received: int | None = None
        self._distributed = accelerator.num_processes > 1
        self._group = dist.new_group(backend="gloo") if self._distributed and accelerator.device.type != "cpu" else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def _start(self) -> tuple[dist.Work, torch.Tensor]:
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        return dist.all_reduce(flag, group=self._group, async_op=True), flag

    def _collect(self) -> bool:
        """The answer of the reduction started last, if any (all ranks started it at the same step)."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item() > 0)

    def step_agreed(self) -> bool:
        """After a training step: whether all ranks stop now, decided from the flags of the previous step."""
        if not self._distributed:
            return self.received is not None
        if self._collect():
            return True
        self._pending = self._start()
        return False

    def agreed(self) -> bool:
        """Between epochs: whether all ranks stop now, waiting for the answer."""
        if not self._distributed:
            return self.received is not None
        earlier = self._collect()
        work, flag = self._start()
        work.wait()
        return earlier or bool(flag.item() > 0)

    def restore(self) -> None:
        self._pending = None  # every rank started it: it completes without being waited for
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Helpers for the few places where running on N processes needs more than ``accelerator.prepare``."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.nn.parallel import DistributedDataParallel


def broadcast_from_main(value: Any) -> Any:
    """Every rank gets the main process's ``value`` (e.g. a timestamped run name)."""
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce; also a barrier)."""
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def rewrap_after_unfreeze(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild the DDP wrapper so newly trainable parameters are all-reduced.

    DDP registers the parameters that require grad when it is constructed; parameters
    unfrozen later would silently train on each rank's own gradients and drift apart. The
    accelerator tracks the inner module, which stays the same object, so ``save_state`` is unaffected.
    """
    if not isinstance(model, DistributedDataParallel):
        return model
    kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
    if accelerator.device.type != "cpu":
        kwargs.update(device_ids=[accelerator.local_process_index], output_device=accelerator.local_process_index)
    return DistributedDataParallel(model.module, **kwargs)

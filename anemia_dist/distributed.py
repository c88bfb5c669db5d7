"""Helpers for the few places where running on N processes needs more than ``accelerator.prepare``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from torch.nn.parallel import DistributedDataParallel


def collective_timeout(minutes: float) -> InitProcessGroupKwargs:
    """The process-group timeout (``train.collective_timeout_minutes``) for ``Accelerator(kwargs_handlers=...)``.

    NCCL gives up on a collective after 10 minutes by default; the other ranks wait in one while
    the main process audits the data, decodes the cache or writes the end-of-run report alone.
    """
    return InitProcessGroupKwargs(timeout=timedelta(minutes=minutes))


def broadcast_from_main(value: Any) -> Any:
    """Every rank gets the main process's ``value`` (e.g. a timestamped run name)."""
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def decided_on_main(decide: Callable[[], Any], is_main: bool) -> Any:
    """``decide()`` run on the main process alone; every rank gets its result, or raises its error.

    Sharing the error too means a bad input stops every rank together, instead of leaving the
    others waiting at the broadcast.
    """
    result: Any = None
    if is_main:
        try:
            result = decide()
        except Exception as error:  # re-raised on every rank below
            result = error
    result = broadcast_from_main(result)
    if isinstance(result, Exception):
        raise result
    return result


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

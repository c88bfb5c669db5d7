"""Weights & Biases tracking through Accelerate's tracker, on the main process only.

Compute nodes often have no internet. Offline runs are written under the run directory (or
``$WANDB_DIR``) and uploaded later with ``wandb sync``. ``tracking.wandb=online`` that cannot
reach W&B, or has no API key, logs offline instead and says so: the run itself goes on. The W&B
run id is saved in every checkpoint, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from .config import Config, TrackingConfig
from .distributed import broadcast_from_main
from .run_dir import unfreeze_epochs

logger = get_logger(__name__)

WANDB = "wandb"
INIT_TIMEOUT_S = 60.0
"""How long ``wandb.init`` may wait for the server before the run falls back to offline."""
REACH_TIMEOUT_S = 5.0


def log_with(cfg: TrackingConfig) -> str | None:
    """The ``Accelerator(log_with=...)`` value."""
    return None if cfg.wandb == "off" else WANDB


def wandb_mode(cfg: TrackingConfig) -> str:
    """A set ``WANDB_MODE`` wins over the config, as everywhere in W&B."""
    return os.environ.get("WANDB_MODE") or str(cfg.wandb)


def wandb_init_kwargs(cfg: Config, run_id: str | None, mode: str) -> dict[str, dict[str, Any]]:
    """``init_kwargs`` for ``accelerator.init_trackers``; ``run_id`` continues that W&B run."""
    kwargs: dict[str, Any] = {
        "name": cfg.tracking.run_name or cfg.run.name,
        "entity": cfg.tracking.entity,
        "tags": cfg.tracking.tags or None,
        "mode": mode,
        "id": run_id,
        "resume": "allow" if run_id else None,
        "settings": {"init_timeout": INIT_TIMEOUT_S},
    }
    if "WANDB_DIR" not in os.environ:
        kwargs["dir"] = os.path.join(cfg.run.output_dir, cfg.run.name)
    return {WANDB: kwargs}


def unreachable(url: str) -> str | None:
    """Why ``url`` (or the proxy for it) cannot be reached within a few seconds; None if it can."""
    target = urllib.parse.urlparse(urllib.request.getproxies().get(urllib.parse.urlparse(url).scheme) or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot reach {url} ({error})"
    return None


def start(accelerator: Accelerator, cfg: Config, run_id: str | None) -> str | None:
    """Open the W&B run with the resolved config; returns its id on every rank (None when off).

    Called on every rank after the run name is fixed and any checkpoint is loaded; ``run_id`` is
    the id saved in that checkpoint.
    """
    if log_with(cfg.tracking) is None:
        return run_id
    if accelerator.is_main_process:
        run_id = _start_main(accelerator, cfg, run_id)
    else:
        accelerator.init_trackers(cfg.tracking.project)  # the same tracker list; it logs nothing here
    return broadcast_from_main(run_id)


def _start_main(accelerator: Accelerator, cfg: Config, run_id: str | None) -> str:
    import wandb

    def init(mode: str) -> None:
        accelerator.init_trackers(
            cfg.tracking.project, config=cfg.to_dict(), init_kwargs=wandb_init_kwargs(cfg, run_id, mode)
        )

    mode = wandb_mode(cfg.tracking)
    problem = unreachable(wandb.setup().settings.base_url) if mode == "online" else None
    if problem is None:
        try:
            init(mode)
        except wandb.errors.Error as error:
            if mode != "online":
                raise
            accelerator.trackers.clear()  # drop the tracker whose run never started
            problem = str(error).splitlines()[0].rstrip(".")
    if problem is not None:
        directory = os.environ.get("WANDB_DIR") or os.path.join(cfg.run.output_dir, cfg.run.name)
        logger.warning(
            f"anemia-dist: W&B online logging unavailable: {problem}. Logging offline instead; upload "
            f"later with `wandb sync {os.path.join(directory, 'wandb', 'offline-run-*')}`."
        )
        init("offline")
    return accelerator.get_tracker(WANDB, unwrap=True).id


def logged_values(row: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl row as W&B values: its numbers, the lr of each parameter group, and the
    number of trainable backbone stages (it steps up at the unfreeze epoch)."""
    values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values.update({f"lr/{name}": lr for name, lr in zip(row["lr_groups"], row["lr"], strict=True)})
    values["trainable_stages"] = len(row["unfrozen"])
    return values


def record_outcome(accelerator: Accelerator, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The best epoch, the unfreeze epoch and how the run ended, in the W&B run's summary."""
    if not accelerator.is_main_process or not any(t.name == WANDB for t in accelerator.trackers):
        return
    outcome = {k: v for k, v in summary.items() if v is None or isinstance(v, (int, float, str, bool))}
    unfrozen = unfreeze_epochs(rows)
    outcome["unfreeze_epoch"] = unfrozen[0] if unfrozen else None
    accelerator.get_tracker(WANDB, unwrap=True).summary.update(outcome)

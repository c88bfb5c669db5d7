"""Experiment tracking through Accelerate's trackers (W&B, MLflow, TensorBoard), on the main process only.

Every tracker of a run gets the same config, one row per epoch (with the lr of each parameter
group) and the run's outcome. The W&B and MLflow run ids are saved in every checkpoint, so a
resumed run continues the same runs, and TensorBoard drops the steps that a resume repeats.

The trackers are Accelerate's own classes, started here rather than by ``init_trackers``: their
run names, folders and ids are known only once the run directory and any checkpoint are.

Compute nodes often have no internet. Offline W&B runs are written under the run directory (or
``$WANDB_DIR``) and uploaded later with ``wandb sync``. ``tracking.wandb=online`` that cannot
reach W&B, or has no API key, logs offline instead and says so: the run itself goes on. An
MLflow server that cannot be reached stops the run before its first epoch, naming the address.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from .config import Config, TrackingConfig
from .distributed import broadcast_from_main
from .errors import ConfigError
from .progress import TrainingProgress
from .run_dir import MLFLOW_ARTIFACTS, MLFLOW_STORE, TENSORBOARD_EVENTS, unfreeze_epochs

logger = get_logger(__name__)

WANDB, MLFLOW, TENSORBOARD = WandBTracker.name, MLflowTracker.name, TensorBoardTracker.name
ORDER = (WANDB, MLFLOW, TENSORBOARD)
"""W&B first: its offline fallback restarts it, which must happen before the others start."""
INIT_TIMEOUT_S = 60.0
"""How long ``wandb.init`` may wait for the server before the run falls back to offline."""
REACH_TIMEOUT_S = 5.0


def tracker_names(cfg: TrackingConfig) -> list[str]:
    """``tracking.log_with``, plus W&B when ``tracking.wandb`` is online or offline."""
    wanted = set(cfg.log_with) | ({WANDB} if cfg.wandb != "off" else set())
    return [name for name in ORDER if name in wanted]


def wandb_mode(cfg: TrackingConfig) -> str:
    """A set ``WANDB_MODE`` wins over the config, as everywhere in W&B; W&B listed in
    ``tracking.log_with`` with ``tracking.wandb=off`` (the default) means online."""
    return os.environ.get("WANDB_MODE") or (str(cfg.wandb) if cfg.wandb != "off" else "online")


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.run.output_dir, cfg.run.name)


def wandb_init_kwargs(cfg: Config, run_id: str | None, mode: str) -> dict[str, Any]:
    """``wandb.init`` arguments; ``run_id`` continues that W&B run."""
    kwargs: dict[str, Any] = {
        "name": _display_name(cfg),
        "entity": cfg.tracking.entity,
        "tags": cfg.tracking.tags or None,
        "group": cfg.tracking.group,
        "mode": mode,
        "id": run_id,
        "resume": "allow" if run_id else None,
        "settings": {"init_timeout": INIT_TIMEOUT_S},
    }
    if "WANDB_DIR" not in os.environ:
        kwargs["dir"] = run_dir(cfg)
    return kwargs


def mlflow_uri(cfg: Config) -> tuple[str, str]:
    """The MLflow tracking URI and where it was set: ``tracking.mlflow_uri``, else
    ``$MLFLOW_TRACKING_URI``, else a SQLite store in run.output_dir."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri, "tracking.mlflow_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path(cfg.run.output_dir).resolve() / MLFLOW_STORE}", "run.output_dir"


def tensorboard_location(cfg: Config) -> tuple[str, str]:
    """(folder, run name) for ``TensorBoardTracker``, which writes to folder/run name."""
    if cfg.tracking.tensorboard_dir:
        return cfg.tracking.tensorboard_dir, cfg.run.name
    return run_dir(cfg), TENSORBOARD_EVENTS


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The config as dotted keys (the names overrides use) with scalar values: MLflow params and
    TensorBoard hparams take no nesting; lists and nulls are written as JSON, readable back as YAML."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


def unreachable(url: str) -> str | None:
    """Why ``url`` (or the proxy for it) cannot be reached within a few seconds; None if it can."""
    target = urllib.parse.urlparse(urllib.request.getproxies().get(urllib.parse.urlparse(url).scheme) or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot reach {url} ({error})"
    return None


def start(accelerator: Accelerator, cfg: Config, progress: TrainingProgress) -> None:
    """Open the runs with the resolved config; their ids go into ``progress`` (saved in checkpoints).

    Called on every rank after the run name is fixed and any checkpoint is loaded, whose ids the
    runs continue. A tracker that cannot start stops every rank with the main process's reason.
    """
    names = tracker_names(cfg.tracking)
    if not names:
        return
    ids, failure = None, None
    if accelerator.is_main_process:
        try:
            ids = _start_main(accelerator, cfg, names, progress)
        except Exception as error:
            failure = error
    ids, problem = broadcast_from_main((ids, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    if problem is not None:
        raise ConfigError(f"tracking: the main process could not start the trackers ({problem})")
    progress.tracker_run_id, progress.mlflow_run_id = ids


def _start_main(
    accelerator: Accelerator, cfg: Config, names: list[str], progress: TrainingProgress
) -> tuple[str | None, str | None]:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"tracking.log_with: {', '.join(missing)} not installed; pip install 'anemia-dist[{','.join(missing)}]'"
        )
    artifacts = _use_mlflow_store(cfg) if MLFLOW in names else None
    values, flat = cfg.to_dict(), flat_config(cfg.to_dict())
    wandb_id, mlflow_id = progress.tracker_run_id, progress.mlflow_run_id
    for name in names:
        if name == WANDB:
            tracker = _start_wandb(cfg, wandb_id)
            tracker.store_init_configuration(values)
            wandb_id = tracker.run.id
        elif name == MLFLOW:
            tags = {tag: "true" for tag in cfg.tracking.tags} or None
            tracker = MLflowTracker(cfg.tracking.project, artifacts, mlflow_id, tags, run_name=_display_name(cfg))
            tracker.start()
            if mlflow_id is None:  # MLflow params are write-once: a resumed run keeps the first values
                tracker.store_init_configuration(flat)
            mlflow_id = tracker.active_run.info.run_id
        else:
            folder, name_in_folder = tensorboard_location(cfg)
            # purge_step: TensorBoard hides the steps of an earlier start that this one logs again.
            resumed = {"purge_step": progress.epoch + 1} if progress.epoch else {}
            tracker = TensorBoardTracker(name_in_folder, folder, **resumed)
            tracker.start()
            tracker.store_init_configuration(flat)
        accelerator.trackers.append(tracker)
    return wandb_id, mlflow_id


def _display_name(cfg: Config) -> str:
    return cfg.tracking.run_name or cfg.run.name


def _use_mlflow_store(cfg: Config) -> str | None:
    """Point MLflow at its store; returns where new experiments keep artifacts (None: the server decides)."""
    import mlflow

    uri, source = mlflow_uri(cfg)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        problem = unreachable(uri)
        if problem is not None:
            raise ConfigError(
                f"{source}: MLflow server {problem}; start it or fix the address, or leave tracking.mlflow_uri "
                f"and MLFLOW_TRACKING_URI unset to log to {MLFLOW_STORE} in run.output_dir"
            )
    mlflow.set_tracking_uri(uri)
    return str(Path(cfg.run.output_dir).resolve() / MLFLOW_ARTIFACTS) if source == "run.output_dir" else None


def _start_wandb(cfg: Config, run_id: str | None) -> WandBTracker:
    import wandb

    def started(mode: str) -> WandBTracker:
        tracker = WandBTracker(cfg.tracking.project, **wandb_init_kwargs(cfg, run_id, mode))
        tracker.start()
        return tracker

    mode = wandb_mode(cfg.tracking)
    problem = unreachable(wandb.setup().settings.base_url) if mode == "online" else None
    if problem is None:
        try:
            return started(mode)
        except wandb.errors.Error as error:
            if mode != "online":
                raise
            problem = str(error).splitlines()[0].rstrip(".")
    directory = os.environ.get("WANDB_DIR") or run_dir(cfg)
    logger.warning(
        f"anemia-dist: W&B online logging unavailable: {problem}. Logging offline instead; upload "
        f"later with `wandb sync {os.path.join(directory, 'wandb', 'offline-run-*')}`."
    )
    return started("offline")


def logged_values(row: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl row as tracker values: its numbers, the lr of each parameter group, and
    the number of trainable backbone stages (it steps up at the unfreeze epoch)."""
    values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values.update({f"lr/{name}": lr for name, lr in zip(row["lr_groups"], row["lr"], strict=True)})
    values["trainable_stages"] = len(row["unfrozen"])
    return values


def record_outcome(accelerator: Accelerator, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The best epoch, the unfreeze epoch and how the run ended: the W&B summary, MLflow metrics
    (numbers) and tags (text), TensorBoard ``summary/`` scalars and text at the last epoch."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    outcome = {k: v for k, v in summary.items() if v is None or isinstance(v, (int, float, str, bool))}
    unfrozen = unfreeze_epochs(rows)
    outcome["unfreeze_epoch"] = unfrozen[0] if unfrozen else None
    numbers = {k: v for k, v in outcome.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    texts = {k: str(v) for k, v in outcome.items() if k not in numbers and v is not None}
    for tracker in accelerator.trackers:
        _record(tracker, outcome, numbers, texts, rows[-1]["epoch"] if rows else 0)


def _record(
    tracker: GeneralTracker, outcome: dict[str, Any], numbers: dict[str, float], texts: dict[str, str], step: int
) -> None:
    if tracker.name == WANDB:
        tracker.run.summary.update(outcome)
    elif tracker.name == MLFLOW:
        import mlflow

        mlflow.log_metrics(numbers)
        mlflow.set_tags(texts)
    elif tracker.name == TENSORBOARD:
        tracker.log({f"summary/{k}": v for k, v in (numbers | texts).items()}, step=step)


def record_summary_run(cfg: Config, values: dict[str, Any]) -> str | None:
    """One more W&B run (a study's pooled numbers) holding ``values`` as its summary, in the group and
    under the name ``cfg.tracking`` gives; returns its id, or None when W&B is not among the trackers."""
    if WANDB not in tracker_names(cfg.tracking):
        return None
    tracker = _start_wandb(cfg, None)
    tracker.store_init_configuration(cfg.to_dict())
    tracker.run.summary.update(values)
    run_id = tracker.run.id
    tracker.finish()
    return run_id

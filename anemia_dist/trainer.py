"""The training loop, where to start reading: :func:`train` is the README's methodology table,
one named call per step.

Set-up: audit and split the data, open the run directory, build the model and freeze its
backbone, let Accelerate wrap model, optimiser, plateau scheduler and loaders, resume if asked.
Then per epoch: unfreeze at its epoch, train one epoch, validate, step the plateau scheduler,
early stopping, save. The synced validation loss drives scheduler, early stopping and
unfreezing identically on every rank; only the main process writes shared files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from . import tracking
from .checkpointing import Checkpointer
from .config import Config, TrainConfig, UnfreezeConfig
from .console import progress_bar
from .datasets import device_transform, make_loaders
from .distributed import broadcast_from_main, rewrap_after_unfreeze
from .early_stopping import EarlyStopping
from .errors import ConfigError
from .figures import plot_curves
from .metrics import OperatingPoint, positive_index, require_both_classes, screening_metrics
from .model import (
    build_model,
    freeze_backbone,
    optimizer_param_groups,
    resolve_stages,
    set_train_mode,
    trainable_stages,
    unfreeze,
)
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher
from .progress import Totals, TrainingProgress, batch_totals
from .report import write_validation_report
from .run_dir import (
    AUDIT_CSV,
    AUDIT_JSON,
    BEST,
    CONFIG,
    CURVES,
    EXCLUDED,
    PREEMPTED,
    REPORT,
    SPLITS,
    SUMMARY,
    RunDirectory,
)
from .splits import SplitData, balanced_class_weights, build_split_on_main, describe_split, excluded_rows, split_rows
from .validation import ValidationResult, validate

logger = get_logger(__name__)


@dataclass
class Training:
    """What the epochs work on, wrapped by Accelerate (DDP, sharded loaders, the once-per-epoch scheduler)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    """ReduceLROnPlateau, stepped once per epoch with the global validation loss."""
    train_loader: DataLoader
    val_loader: DataLoader
    class_weights: torch.Tensor


@dataclass
class EpochResult:
    totals: Totals
    """Global over every rank, the batches trained before a mid-epoch resume included."""
    steps: int
    """Batches trained in this epoch so far (all of them unless preempted)."""
    started: float
    """``time.perf_counter()`` when this process started the epoch."""
    seconds: float
    """Training time of the epoch, the part before a mid-epoch resume included."""
    preempted: bool = False


@dataclass
class BestEpoch:
    """The best epoch's validation predictions and operating point, for the end-of-run report."""

    val: ValidationResult
    point: OperatingPoint


def train(cfg: Config) -> dict[str, Any]:
    """Run the methodology; returns the summary (on every rank)."""
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    split = audited_split(cfg, accelerator)
    run = RunDirectory(resolve_run_dir(cfg), writes=accelerator.is_main_process)
    checkpointer = Checkpointer(accelerator, run.path, cfg, split.classes)
    resume_from = checkpointer.resume_point()  # a bad run.resume stops before any file is written
    model = build_model(cfg.model, len(split.classes), cfg.data.image_size)  # so do missing weights
    resolve_stages(model, cfg.unfreeze.layers)  # and a timm backbone's misspelt stage
    write_run_start(cfg, run, split)
    loaders = make_loaders(cfg, split, pin_memory=accelerator.device.type == "cuda")
    freeze_backbone(model)  # phase 1, the head alone: before DDP wraps the model, as DDP syncs what trains now
    training = prepare_training(cfg, accelerator, model, loaders, split)
    set_seed(cfg.train.seed, device_specific=True)  # own augmentation and dropout streams per rank
    stopper = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta)
    progress = TrainingProgress()
    checkpointer.track(stopper, progress)
    if resume_from is not None:
        training.model = checkpointer.restore(
            resume_from, training.model, lambda m: unfreeze_stages(accelerator, m, cfg)
        )
        logger.info(f"resumed from {resume_from} (epoch {progress.epoch}, step {progress.step})")
    rows = broadcast_from_main(run.keep_metrics_through(progress.epoch))
    tracking.start(accelerator, cfg, progress)
    run.remove(PREEMPTED)
    log_start(accelerator, cfg, split, run)

    stop_reason, best = "max_epochs", None
    watcher = PreemptionWatcher(accelerator)
    try:
        for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
            if should_unfreeze(cfg.unfreeze, epoch, stopper, progress.unfrozen):
                training.model = unfreeze_stages(accelerator, training.model, cfg)
                progress.unfrozen = True
                logger.info(f"epoch {epoch}: unfreezing {cfg.unfreeze.layers}")
            lrs = [group["lr"] for group in training.optimizer.param_groups]
            trained = train_one_epoch(accelerator, training, epoch, watcher, progress)
            if trained.preempted:
                progress.pause(trained.steps, trained.totals, trained.seconds)
                exit_preempted(accelerator, run, checkpointer.save(progress, stopper.best_epoch))
            val = validate(accelerator, training.model, training.val_loader, training.class_weights)
            point, screening = screening_metrics(val.labels, val.probs, split.classes, cfg.eval)
            training.scheduler.step(val.loss)
            improved = stopper.update(val.loss, epoch)
            if improved:
                best = BestEpoch(val, point)
                checkpointer.save_best(training.model, epoch, val.loss, val.accuracy, point)
            row = metrics_row(accelerator, training, epoch, trained, val, screening, lrs)
            record_epoch(accelerator, run, rows, row, improved)
            progress.complete(epoch)
            saved = checkpointer.save(progress, stopper.best_epoch)
            reason = stopping_reason(val.loss, stopper)
            if reason is not None:
                stop_reason = reason
                break
            if watcher.agreed():  # a signal during validation or the save
                exit_preempted(accelerator, run, saved)
    finally:
        watcher.restore()
    return finish_run(accelerator, cfg, run, split, stopper, rows, stop_reason, best)


# --------------------------------------------------------------------------- set-up


def make_accelerator(cfg: Config) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        # The plateau scheduler is stepped once per epoch with the global validation loss; by
        # default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        # non_blocking: copies from the loaders' pinned memory overlap with compute.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed, non_blocking=True
        ),
    )


def audited_split(cfg: Config, accelerator: Accelerator) -> SplitData:
    """Every file audited on the main process before anything trains; all ranks get its split.

    The evaluation settings are checked against it now, not after the first epoch: a misspelt
    positive class, or a threshold rule with validation images of one kind only.
    """
    split = build_split_on_main(cfg.data, cfg.train.seed, accelerator.is_main_process)
    positive = positive_index(split.classes, cfg.eval.positive_class)
    require_both_classes([s.label == positive for s in split.val], cfg.eval)
    return split


def resolve_run_dir(cfg: Config) -> Path:
    """``run.output_dir/run.name``; a timestamped name is chosen on the main process and shared."""
    name = cfg.run.name or broadcast_from_main(datetime.now().strftime("%Y%m%d-%H%M%S"))
    cfg.run.name = name
    return Path(cfg.run.output_dir) / name


def write_run_start(cfg: Config, run: RunDirectory, split: SplitData) -> None:
    """The resolved config, the split and the audit, before training; an existing run is never overwritten."""
    if cfg.run.resume is None and run.has_metrics():
        raise ConfigError(
            f"run.name: {run.path} already holds a run; continue it with run.resume=auto or choose another run.name"
        )
    run.write_text(CONFIG, cfg.to_yaml())
    run.write_csv(SPLITS, split_rows(split))
    run.write_csv(AUDIT_CSV, split.audit.rows())
    run.write_json(AUDIT_JSON, split.audit.summary())
    run.write_csv(EXCLUDED, excluded_rows(split))
    logger.info(describe_split(split, run.path / EXCLUDED))


def apply_speed_settings(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """``train.channels_last``: weights in the batches' layout, no conversion inside every convolution;
    ``train.compile``: compiled in place (state-dict keys, unwrap_model and the DDP re-wrap unchanged)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam over the head and every stage that will be unfrozen, from the start (it never changes shape)."""
    groups = optimizer_param_groups(model, cfg.unfreeze.layers)
    return torch.optim.Adam(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def prepare_training(
    cfg: Config,
    accelerator: Accelerator,
    model: torch.nn.Module,
    loaders: tuple[DataLoader, DataLoader],
    split: SplitData,
) -> Training:
    """Class weights from the training split, optimiser, plateau scheduler; Accelerate wraps them all."""
    class_weights = loss_class_weights(cfg.train, split).to(accelerator.device)
    apply_speed_settings(model, cfg.train)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.scheduler.factor, patience=cfg.scheduler.patience, min_lr=cfg.scheduler.min_lr
    )
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(model, optimizer, *loaders, scheduler)
    return Training(model, optimizer, scheduler, train_loader, val_loader, class_weights)


def loss_class_weights(cfg: TrainConfig, split: SplitData) -> torch.Tensor:
    """``train.class_weights``: sklearn's 'balanced' weights from the training split, or all ones."""
    if cfg.class_weights == "none":
        return torch.ones(len(split.classes))
    return balanced_class_weights(split.train, len(split.classes))


def log_start(accelerator: Accelerator, cfg: Config, split: SplitData, run: RunDirectory) -> None:
    logger.info(
        f"training {cfg.model.arch} on {len(split.train)} images, validating on {len(split.val)}, "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
        f"classes {split.classes}, run dir {run.path}"
    )


# --------------------------------------------------------------------------- one epoch


def should_unfreeze(cfg: UnfreezeConfig, epoch: int, stopper: EarlyStopping, unfrozen: bool) -> bool:
    """At the start of ``epoch``: past the head-only epochs, or the head has plateaued."""
    if unfrozen:
        return False
    plateau = cfg.plateau_patience
    return epoch > cfg.head_only_epochs or (plateau is not None and stopper.bad_epochs >= plateau)


def unfreeze_stages(accelerator: Accelerator, model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """``unfreeze.layers`` train from now on, and DDP is rebuilt so their gradients are all-reduced."""
    unfreeze(accelerator.unwrap_model(model), cfg.unfreeze.layers)
    return rewrap_after_unfreeze(accelerator, model)


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    backward: Callable[[torch.Tensor], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted cross-entropy, one optimiser step; returns the logits and the loss."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels, weight=class_weights)
    backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits, loss


def train_one_epoch(
    accelerator: Accelerator, training: Training, epoch: int, watcher: PreemptionWatcher, progress: TrainingProgress
) -> EpochResult:
    """One pass over the training data, or the rest of it after a mid-epoch preemption checkpoint."""
    started = time.perf_counter()
    set_train_mode(accelerator.unwrap_model(training.model))
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # Totals, kept on the device
    if accelerator.is_main_process:  # the resumed part of the epoch, counted once globally
        totals += progress.partial.to_tensor(totals.device)
    loader = training.train_loader
    loader.set_epoch(epoch)  # the shuffle order depends on the epoch only, also after a resume
    batches = accelerator.skip_first_batches(loader, progress.step) if progress.step else loader
    bar = progress_bar(accelerator, batches, f"epoch {epoch} train", initial=progress.step, total=len(loader))
    transform = device_transform(loader)
    steps, preempted = progress.step, False
    for step, (images, labels) in enumerate(bar):
        logits, loss = training_step(
            training.model, training.optimizer, transform(images), labels, training.class_weights, accelerator.backward
        )
        totals += batch_totals(logits, labels, training.class_weights)
        if step % 20 == 0:  # .item() waits for the device; every step would stall the pipeline
            bar.set_postfix(loss=f"{loss.item():.4f}")
        steps += 1
        if steps < len(loader) and watcher.step_agreed():
            preempted = True
            break
    global_totals = Totals.from_tensor(accelerator.reduce(totals, reduction="sum"))
    seconds = time.perf_counter() - started + progress.partial_seconds
    return EpochResult(global_totals, steps, started, seconds, preempted)


def metrics_row(
    accelerator: Accelerator,
    training: Training,
    epoch: int,
    trained: EpochResult,
    val: ValidationResult,
    screening: dict[str, float],
    lrs: list[float],
) -> dict[str, Any]:
    """One line of metrics.jsonl (and of the tracker's history)."""
    return {
        "epoch": epoch,
        "train_loss": trained.totals.loss,
        "train_acc": trained.totals.accuracy,
        "val_loss": val.loss,
        "val_acc": val.accuracy,
        **{f"val_{name}": value for name, value in screening.items()},
        "lr": lrs,
        "lr_groups": [group["name"] for group in training.optimizer.param_groups],
        "unfrozen": trainable_stages(accelerator.unwrap_model(training.model)),
        "world_size": accelerator.num_processes,
        "epoch_seconds": time.perf_counter() - trained.started,
        "train_images_per_second": trained.totals.seen / trained.seconds,
    }


def record_epoch(
    accelerator: Accelerator, run: RunDirectory, rows: list[dict[str, Any]], row: dict[str, Any], improved: bool
) -> None:
    """The row into metrics.jsonl, the tracker and the log."""
    rows.append(row)
    run.append_metrics(row)
    accelerator.log(tracking.logged_values(row), step=row["epoch"])
    logger.info(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} auroc {row['val_auroc']:.3f}  lr {row['lr'][0]:.2e}"
        + ("  *best" if improved else "")
    )


def stopping_reason(val_loss: float, stopper: EarlyStopping) -> str | None:
    """Why training ends after this epoch, or None to go on."""
    if not math.isfinite(val_loss):
        return "non_finite_val_loss"
    if stopper.should_stop:
        return "early_stopping"
    return None


def exit_preempted(accelerator: Accelerator, run: RunDirectory, checkpoint_dir: Path) -> NoReturn:
    run.write_json(PREEMPTED, {"checkpoint": str(checkpoint_dir), "exit_code": PREEMPTED_EXIT_CODE})
    accelerator.wait_for_everyone()
    raise Preempted(f"preempted: state saved in {checkpoint_dir}; continue with run.resume=auto")


# --------------------------------------------------------------------------- the end


def finish_run(
    accelerator: Accelerator,
    cfg: Config,
    run: RunDirectory,
    split: SplitData,
    stopper: EarlyStopping,
    rows: list[dict[str, Any]],
    stop_reason: str,
    best: BestEpoch | None,
) -> dict[str, Any]:
    """summary.json, the curves, the best epoch's validation report and the tracker's summary."""
    summary = {
        "best_epoch": stopper.best_epoch,
        "best_val_loss": stopper.best,
        "best_val_acc": next((r["val_acc"] for r in rows if r["epoch"] == stopper.best_epoch), None),
        "epochs_run": len(rows),
        "stopped_early": stop_reason != "max_epochs",
        "stop_reason": stop_reason,
        "world_size": accelerator.num_processes,
        "run_dir": str(run.path),
    }
    run.write_json(SUMMARY, summary)
    if run.writes and rows:
        plot_curves(rows, run.path / CURVES)
    if best is None:  # the best epoch ran before a resume: its validation predictions are gone
        logger.info(
            f"no validation report: the best epoch ran before the resume; for one, run `anemia-dist evaluate "
            f"--checkpoint {run.path / BEST} --data {run.path / SPLITS} --split val`"
        )
    elif accelerator.is_main_process:
        groups = [s.unit or s.group for s in split.val]  # patients, merged with their duplicate images
        labels, probs, bootstrap = best.val.labels, best.val.probs, cfg.eval.bootstrap
        write_validation_report(
            run.path / REPORT, labels, probs, groups, split.classes, best.point, bootstrap, stopper.best_epoch, rows
        )
    tracking.record_outcome(accelerator, summary, rows)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary

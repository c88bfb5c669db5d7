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
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, set_seed
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
from .inference import error_explainer
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
from .quality import QUALITY, training_ranges
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
    if accelerator.is_main_process:  # the quality gate's ranges, saved in best/meta.json
        data = cfg.data
        train_paths = [s.path for s in split.train]
        checkpointer.model_meta[QUALITY] = training_ranges(
            train_paths, data.alpha_background, data.min_size, data.num_workers
        )
    resume_from = checkpointer.resume_point()  # a bad run.resume stops before any file is written
    model = build_model(cfg.model, len(split.classes), cfg.data.image_size)  # so do missing weights
    resolve_stages(model, cfg.unfreeze.layers)  # and a timm backbone's misspelt stage
    write_run_start(cfg, run, split)
    loaders = make_loaders(cfg, split, pin_memory=accelerator.device.type == "cuda")
    freeze_backbone(model)  # phase 1, the head alone: before DDP wraps the model, as DDP syncs what trains now
    training = prepare_training(cfg, accelerator, model, loaders, split)
    checkpointer.require_space(training.model, training.optimizer)
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
    """Accelerate as the loop needs it; a launcher's dynamo backend is refused (see :func:`refuse_dynamo`)."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        # The plateau scheduler is stepped once per epoch with the global validation loss; by
        # default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        # non_blocking: copies from the loaders' pinned memory overlap with compute.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed, non_blocking=True
        ),
    )
    refuse_dynamo(accelerator)
    return accelerator


def refuse_dynamo(accelerator: Accelerator) -> None:
    """``--dynamo_backend`` (or ``dynamo_config`` in an accelerate config file) makes ``prepare``
    return a compiled module around the DDP wrapper: unfreezing would then not see the wrapper to
    rebuild, and the unfrozen layers would drift apart across ranks. ``train.compile`` compiles the
    model in place, under the wrapper, where the rebuild works."""
    backend = accelerator.state.dynamo_plugin.backend
    if backend != DynamoBackend.NO:
        raise ConfigError(
            f"accelerate launch --dynamo_backend {backend.value.lower()}: not supported by anemia-dist train "
            f"(the DDP wrapper must be rebuilt when layers unfreeze); launch with --dynamo_backend no "
            f"(or drop dynamo_config from the accelerate config file) and set train.compile=true instead"
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
    """The resolved config, the split and the audit, before training."""
    refuse_existing_run(cfg, run)
    run.write_text(CONFIG, cfg.to_yaml())
    run.write_csv(SPLITS, split_rows(split))
    run.write_csv(AUDIT_CSV, split.audit.rows())
    run.write_json(AUDIT_JSON, split.audit.summary())
    run.write_csv(EXCLUDED, excluded_rows(split))
    logger.info(describe_split(split, run.path / EXCLUDED))


def refuse_existing_run(cfg: Config, run: RunDirectory) -> None:
    """An existing run is never overwritten; the main process looks and every rank follows its
    answer (listings on a shared file system can be stale)."""
    if cfg.run.resume is None and broadcast_from_main(run.has_metrics()):
        raise ConfigError(
            f"run.name: {run.path} already holds a run; continue it with run.resume=auto or choose another run.name"
        )


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


def real_samples(step: int, rank: int, world: int, batch_size: int, dataset_size: int) -> int:
    """How many leading samples of this rank's batch ``step`` are the epoch's own images.

    Accelerate's ``even_batches`` gives every rank the same number of full batches: batch
    ``step * world + rank`` of the epoch's order goes to ``rank``, and the last round is filled by
    wrapping to the start of the order. Those wrapped samples (positions past ``dataset_size``)
    were already trained this epoch; they are the rest of the batch.
    """
    first = (step * world + rank) * batch_size
    return max(0, min(batch_size, dataset_size - first))


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    backward: Callable[[torch.Tensor], None],
    real: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted cross-entropy Σ w_y·ℓ / Σ w_y over the first ``real`` samples (all when
    None), one optimiser step; returns the logits and the loss.

    The padded rest still runs through the model (same shapes on every rank and step) but
    weighs nothing: a rank whose batch is all padding steps with a zero gradient, as DDP needs
    every rank to take part in each all-reduce.
    """
    logits = model(images)
    weights = class_weights[labels]
    if real is not None and real < len(labels):
        weights = weights * (torch.arange(len(labels), device=labels.device) < real)
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    loss = (weights * per_sample).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
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
    world, rank, size = accelerator.num_processes, accelerator.process_index, len(loader.dataset)
    for images, labels in bar:
        real = real_samples(steps, rank, world, len(labels), size) if world > 1 else len(labels)
        logits, loss = training_step(
            training.model,
            training.optimizer,
            transform(images),
            labels,
            training.class_weights,
            accelerator.backward,
            real,
        )
        totals += batch_totals(logits[:real], labels[:real], training.class_weights)
        if steps % 20 == 0:  # .item() waits for the device; every step would stall the pipeline
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
        "train_images": round(trained.totals.seen),
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
        # the most confident errors with their heat-maps, drawn by the saved best model
        paths, directory = [s.path for s in split.val], run.path / REPORT
        explain = error_explainer(run.path / BEST, paths, directory, accelerator.device, cfg.data.cache_dir)
        write_validation_report(
            run.path / REPORT,
            labels,
            probs,
            groups,
            split.classes,
            best.point,
            bootstrap,
            stopper.best_epoch,
            rows,
            explain,
        )
    tracking.record_outcome(accelerator, summary, rows)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary

"""The training loop: the methodology, step by step, on 1..N processes."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, tracking
from .cache import cached_datasets
from .checkpointer import Checkpointer, TrainingProgress, check_compatible, read_info, resolve_resume
from .config import Config, ConfigError
from .data import (
    ImageDataset,
    SplitData,
    balanced_class_weights,
    build_split_on_main,
    describe_split,
    excluded_rows,
    split_rows,
)
from .distributed import broadcast_from_main, rewrap_after_unfreeze
from .early_stopping import EarlyStopping
from .evaluation import epoch_metrics, positive_index
from .model import build_model, optimizer_param_groups, set_train_mode, trainable_stages, unfreeze
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher
from .report import write_validation_report
from .reporting import PREEMPTED_FILE, RunDirectory
from .transforms import eval_transform, train_transform


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    steps: int
    """Batches trained in this epoch so far (all of them unless preempted)."""
    totals: list[float]
    """Global Σw·ℓ, Σw, correct, n: what a preemption checkpoint carries into the resumed epoch."""
    preempted: bool = False


@dataclass
class ValidationResult:
    """Every validation sample exactly once, identical on every rank."""

    loss: float
    accuracy: float
    labels: torch.Tensor
    probs: torch.Tensor


CHECKPOINTS = "checkpoints"


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


def resolve_run_dir(cfg: Config) -> Path:
    """``run.output_dir/run.name``; a timestamped name is chosen on the main process and shared."""
    name = cfg.run.name or broadcast_from_main(datetime.now().strftime("%Y%m%d-%H%M%S"))
    cfg.run.name = name
    return Path(cfg.run.output_dir) / name


def make_loaders(cfg: Config, split: SplitData, pin_memory: bool) -> tuple[DataLoader, DataLoader]:
    workers = cfg.data.num_workers
    common = dict(
        batch_size=cfg.train.batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    if cfg.data.pipeline == "gpu":
        train, val = cached_datasets(cfg.data, split, cfg.train.channels_last)
    else:
        background = cfg.data.alpha_background
        train = ImageDataset(split.train, train_transform(cfg.data.image_size), background)
        val = ImageDataset(split.val, eval_transform(cfg.data.image_size), background)
    # Own generators: creating a loader iterator otherwise draws from the global RNG, which the
    # checkpoints restore, and a mid-epoch resume (a fresh iterator) would start one draw off.
    return (
        DataLoader(train, shuffle=True, generator=torch.Generator().manual_seed(cfg.train.seed), **common),
        DataLoader(val, shuffle=False, generator=torch.Generator().manual_seed(cfg.train.seed), **common),
    )


def device_transform(loader: DataLoader) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the training device does to a batch before the model: the cached pipeline's batched
    augmentation (or validation resize) and normalisation; PIL-pipeline batches arrive finished."""
    return getattr(loader.dataset, "batch_transform", torch.nn.Identity())


def progress_bar(accelerator: Accelerator, iterable, desc: str, **kwargs) -> tqdm:
    """tqdm on the main process; in a log file (SLURM, CI) a line every 30 s, not every batch."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        leave=False,
        mininterval=0.1 if interactive else 30.0,
        **kwargs,
    )


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    class_weights: torch.Tensor,
    epoch: int,
    watcher: PreemptionWatcher,
    progress: TrainingProgress,
) -> EpochStats:
    """One pass over the training data, or the rest of it after a mid-epoch preemption checkpoint."""
    set_train_mode(accelerator.unwrap_model(model))
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # Σw·ℓ, Σw, correct, n
    if accelerator.is_main_process:  # the resumed part of the epoch, counted once globally
        totals += torch.tensor(progress.partial, dtype=torch.float64, device=totals.device)
    loader.set_epoch(epoch)  # the shuffle order depends on the epoch only, also after a resume
    batches = accelerator.skip_first_batches(loader, progress.step) if progress.step else loader
    bar = progress_bar(accelerator, batches, f"epoch {epoch} train", initial=progress.step, total=len(loader))
    transform = device_transform(loader)
    steps, preempted = progress.step, False
    for step, (images, labels) in enumerate(bar):
        logits = model(transform(images))
        loss = F.cross_entropy(logits, labels, weight=class_weights)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            weights = class_weights[labels]
            totals += torch.stack(
                [
                    (weights * F.cross_entropy(logits.float(), labels, reduction="none")).sum().double(),
                    weights.sum().double(),
                    (logits.argmax(1) == labels).sum().double(),
                    labels.new_full((), len(labels), dtype=torch.float64),  # filled there: no copy, no wait
                ]
            )
        if step % 20 == 0:  # .item() waits for the device; every step would stall the pipeline
            bar.set_postfix(loss=f"{loss.item():.4f}")
        steps += 1
        if steps < len(loader) and watcher.agreed():
            preempted = True
            break
    global_totals = accelerator.reduce(totals, reduction="sum").tolist()
    weighted_loss, weight_sum, correct, seen = global_totals
    return EpochStats(weighted_loss / weight_sum, correct / seen, int(seen), steps, global_totals, preempted)


@torch.no_grad()
def validate(
    accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, class_weights: torch.Tensor
) -> ValidationResult:
    """The class-weighted mean loss Σ w_y·ℓ / Σ w_y over the whole validation set.

    Per-sample values are gathered batch by batch with ``gather_for_metrics``, which drops the
    duplicates the distributed sampler pads the last batch with; every rank then reduces the
    same tensors, so the result equals the one-process value and is identical on all ranks.
    """
    model.eval()
    losses, labels, probs = [], [], []
    bar = progress_bar(accelerator, loader, "validate")
    transform = device_transform(loader)
    for images, targets in bar:
        logits = model(transform(images)).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss, targets, prob = accelerator.gather_for_metrics((loss, targets, logits.softmax(dim=1)))
        losses.append(loss.double())
        labels.append(targets)
        probs.append(prob.double())
    # One copy to the host for the whole set, not a wait for the device per batch.
    loss, labels_all, probs_all = (torch.cat(parts).cpu() for parts in (losses, labels, probs))
    weights = class_weights.double().cpu()[labels_all]
    weighted = float((weights * loss).sum() / weights.sum())
    accuracy = float((probs_all.argmax(1) == labels_all).double().mean())
    return ValidationResult(weighted, accuracy, labels_all, probs_all)


def should_unfreeze(cfg: Config, epoch: int, stopper: EarlyStopping, unfrozen: bool) -> bool:
    """At the start of ``epoch``: past the head-only epochs, or the head has plateaued."""
    if unfrozen:
        return False
    plateau = cfg.unfreeze.plateau_patience
    return epoch > cfg.unfreeze.epoch or (plateau is not None and stopper.bad_epochs >= plateau)


def train(cfg: Config) -> dict[str, Any]:
    """Run the methodology; returns the summary (on every rank)."""
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    # Audit every file on the main process before anything trains; all ranks get its result.
    split = build_split_on_main(cfg.data, cfg.train.seed, accelerator.is_main_process)
    positive_index(split.classes, cfg.eval.positive_class)  # a misspelt class fails now, not after an epoch
    run = RunDirectory(resolve_run_dir(cfg), writes=accelerator.is_main_process)
    resume_from = resolve_resume(cfg.run.resume, run.path / CHECKPOINTS)
    if cfg.run.resume is None and run.has_metrics():
        raise ConfigError(
            f"run.name: {run.path} already holds a run; continue it with run.resume=auto or choose another run.name"
        )
    run.write_text("config.yaml", cfg.to_yaml())
    run.write_csv("splits.csv", split_rows(split))
    run.write_csv("audit.csv", split.audit.rows())
    run.write_json("audit.json", split.audit.summary())
    run.write_csv("excluded.csv", excluded_rows(split))
    accelerator.print(describe_split(split, run.path))

    class_weights = balanced_class_weights(split.train, len(split.classes)).to(accelerator.device)
    train_loader, val_loader = make_loaders(cfg, split, pin_memory=accelerator.device.type == "cuda")
    model = build_model(cfg.model, len(split.classes))
    if cfg.train.channels_last:  # weights in the batches' layout: no conversion inside every convolution
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()  # in place: state-dict keys, unwrap_model and the DDP re-wrap are unchanged
    groups = optimizer_param_groups(model, cfg.unfreeze.layers)
    optimizer = torch.optim.Adam(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.scheduler.factor, patience=cfg.scheduler.patience, min_lr=cfg.scheduler.min_lr
    )
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    # Different augmentation and dropout streams per rank; the model is already identical.
    set_seed(cfg.train.seed, device_specific=True)
    stopper = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(stopper, progress)
    checkpointer = Checkpointer(
        accelerator, run.path / CHECKPOINTS, cfg.checkpoint.keep_last, checkpoint_identity(cfg, split.classes)
    )
    if resume_from is not None:
        model = restore_training_state(accelerator, model, resume_from, checkpointer, cfg)
        accelerator.print(f"resumed from {resume_from} (epoch {progress.epoch}, step {progress.step})")
    rows = broadcast_from_main(run.keep_metrics_through(progress.epoch))
    tracking.start(accelerator, cfg, progress)
    run.remove(PREEMPTED_FILE)
    accelerator.print(
        f"training {cfg.model.arch} on {len(split.train)} images, validating on {len(split.val)}, "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
        f"classes {split.classes}, run dir {run.path}"
    )

    stop_reason = "max_epochs"
    best_val, best_point = None, None  # the best epoch's validation predictions, for the report
    watcher = PreemptionWatcher(accelerator)
    try:
        for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
            if should_unfreeze(cfg, epoch, stopper, progress.unfrozen):
                model = unfreeze_backbone_stages(accelerator, model, cfg.unfreeze.layers)
                progress.unfrozen = True
                accelerator.print(f"epoch {epoch}: unfreezing {cfg.unfreeze.layers}")
            lrs = [group["lr"] for group in optimizer.param_groups]

            started = time.perf_counter()
            train_stats = train_one_epoch(
                accelerator, model, train_loader, optimizer, class_weights, epoch, watcher, progress
            )
            train_seconds = time.perf_counter() - started + progress.partial_seconds
            if train_stats.preempted:
                progress.step, progress.partial = train_stats.steps, train_stats.totals
                progress.partial_seconds = train_seconds
                exit_preempted(accelerator, run, checkpointer.save(progress, stopper.best_epoch))
            progress.step, progress.partial, progress.partial_seconds = 0, [0.0] * 4, 0.0
            val = validate(accelerator, model, val_loader, class_weights)
            # The threshold (and temperature) this epoch's model would be saved with, and the metrics at it.
            point, screening = epoch_metrics(val.labels, val.probs, split.classes, cfg.eval)

            scheduler.step(val.loss)
            improved = stopper.update(val.loss, epoch)
            if improved:
                best_val, best_point = val, point
            if improved and accelerator.is_main_process:
                checkpoint.save_best(
                    accelerator.unwrap_model(model),
                    run.path / "best",
                    best_meta(cfg, split.classes, epoch, val) | point.to_meta(),
                )
            row = {
                "epoch": epoch,
                "train_loss": train_stats.loss,
                "train_acc": train_stats.accuracy,
                "val_loss": val.loss,
                "val_acc": val.accuracy,
                **{f"val_{name}": value for name, value in screening.items()},
                "lr": lrs,
                "lr_groups": [group["name"] for group in optimizer.param_groups],
                "unfrozen": trainable_stages(accelerator.unwrap_model(model)),
                "world_size": accelerator.num_processes,
                "epoch_seconds": time.perf_counter() - started,
                "train_images_per_second": train_stats.images / train_seconds,
            }
            rows.append(row)
            run.append_metrics(row)
            accelerator.log(tracking.epoch_metrics(row), step=epoch)
            accelerator.print(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} auroc {row['val_auroc']:.3f}  lr {lrs[0]:.2e}"
                + ("  *best" if improved else "")
            )
            progress.epoch = epoch
            saved = checkpointer.save(progress, stopper.best_epoch)
            if not math.isfinite(val.loss):
                stop_reason = "non_finite_val_loss"
                break
            if stopper.should_stop:
                stop_reason = "early_stopping"
                break
            if watcher.agreed():  # a signal during validation or the save
                exit_preempted(accelerator, run, saved)
    finally:
        watcher.restore()

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
    run.write_json("summary.json", summary)
    run.plot_curves(rows)
    if best_val is None:  # the best epoch ran before a resume: its validation predictions are gone
        accelerator.print(
            f"no validation report: the best epoch ran before the resume; for one, run `anemia-dist evaluate "
            f"--checkpoint {run.path / 'best'} --data {run.path / 'splits.csv'} --split val`"
        )
    elif accelerator.is_main_process:
        groups = [s.unit or s.group for s in split.val]  # patients, merged with their duplicate images
        write_validation_report(
            run.path / "report",
            best_val.labels,
            best_val.probs,
            groups,
            split.classes,
            best_point,
            cfg.eval.bootstrap,
            stopper.best_epoch,
            rows,
        )
    tracking.record_outcome(accelerator, summary, rows)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def checkpoint_identity(cfg: Config, classes: list[str]) -> dict[str, Any]:
    """What a checkpoint's tensors depend on: resuming with anything else is refused."""
    return {
        "arch": cfg.model.arch,
        "classes": classes,
        "hidden": cfg.model.hidden,
        "unfreeze_layers": cfg.unfreeze.layers,
    }


def unfreeze_backbone_stages(accelerator: Accelerator, model: torch.nn.Module, stages: list[str]) -> torch.nn.Module:
    unfreeze(accelerator.unwrap_model(model), stages)
    return rewrap_after_unfreeze(accelerator, model)


def restore_training_state(
    accelerator: Accelerator, model: torch.nn.Module, checkpoint_dir: Path, checkpointer: Checkpointer, cfg: Config
) -> torch.nn.Module:
    """Give the model the shape it had when saved (unfrozen stages, DDP wrapper), then load into it."""
    check_compatible(checkpoint_dir, checkpointer.identity)
    if read_info(checkpoint_dir)["progress"]["unfrozen"]:
        model = unfreeze_backbone_stages(accelerator, model, cfg.unfreeze.layers)
    accelerator.load_state(str(checkpoint_dir))
    return model


def exit_preempted(accelerator: Accelerator, run: RunDirectory, checkpoint_dir: Path) -> NoReturn:
    run.write_json(PREEMPTED_FILE, {"checkpoint": str(checkpoint_dir), "exit_code": PREEMPTED_EXIT_CODE})
    accelerator.wait_for_everyone()
    raise Preempted(f"preempted: state saved in {checkpoint_dir}; continue with run.resume=auto")


def best_meta(cfg: Config, classes: list[str], epoch: int, val: ValidationResult) -> dict[str, Any]:
    return {
        "arch": cfg.model.arch,
        "classes": classes,
        "image_size": cfg.data.image_size,
        "alpha_background": cfg.data.alpha_background,
        "hidden": cfg.model.hidden,
        "dropout": cfg.model.dropout,
        "epoch": epoch,
        "val_loss": val.loss,
        "val_acc": val.accuracy,
    }

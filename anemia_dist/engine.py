"""The training loop: the methodology, step by step, on 1..N processes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config
from .data import ImageDataset, SplitData, balanced_class_weights, build_split, split_rows
from .distributed import broadcast_from_main, rewrap_after_unfreeze
from .early_stopping import EarlyStopping
from .model import build_model, optimizer_param_groups, set_train_mode, trainable_stages, unfreeze
from .reporting import RunDirectory
from .transforms import eval_transform, train_transform


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int


@dataclass
class ValidationResult:
    """Every validation sample exactly once, identical on every rank."""

    loss: float
    accuracy: float
    labels: torch.Tensor
    probs: torch.Tensor


def make_accelerator(cfg: Config) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        # The plateau scheduler is stepped once per epoch with the global validation loss; by
        # default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
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
    background = cfg.data.alpha_background
    train = ImageDataset(split.train, train_transform(cfg.data.image_size), background)
    val = ImageDataset(split.val, eval_transform(cfg.data.image_size), background)
    return DataLoader(train, shuffle=True, **common), DataLoader(val, shuffle=False, **common)


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    class_weights: torch.Tensor,
    epoch: int,
) -> EpochStats:
    set_train_mode(accelerator.unwrap_model(model))
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # Σw·ℓ, Σw, correct, n
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not accelerator.is_local_main_process, leave=False)
    for images, labels in bar:
        logits = model(images)
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
                    torch.tensor(float(len(labels)), dtype=torch.float64, device=totals.device),
                ]
            )
        bar.set_postfix(loss=f"{loss.item():.4f}")
    weighted_loss, weight_sum, correct, seen = accelerator.reduce(totals, reduction="sum").tolist()
    return EpochStats(weighted_loss / weight_sum, correct / seen, int(seen))


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
    bar = tqdm(loader, desc="validate", disable=not accelerator.is_local_main_process, leave=False)
    for images, targets in bar:
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss, targets, prob = accelerator.gather_for_metrics((loss, targets, logits.softmax(dim=1)))
        losses.append(loss.double().cpu())
        labels.append(targets.cpu())
        probs.append(prob.double().cpu())
    loss, labels_all, probs_all = torch.cat(losses), torch.cat(labels), torch.cat(probs)
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
    split = build_split(cfg.data, cfg.train.seed)
    run = RunDirectory(resolve_run_dir(cfg), writes=accelerator.is_main_process)
    run.write_text("config.yaml", cfg.to_yaml())
    run.write_csv("splits.csv", split_rows(split))

    class_weights = balanced_class_weights(split.train, len(split.classes)).to(accelerator.device)
    train_loader, val_loader = make_loaders(cfg, split, pin_memory=accelerator.device.type == "cuda")
    model = build_model(cfg.model, len(split.classes))
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
    accelerator.print(
        f"training {cfg.model.arch} on {len(split.train)} images, validating on {len(split.val)}, "
        f"{accelerator.num_processes} process(es), classes {split.classes}, run dir {run.path}"
    )

    rows: list[dict[str, Any]] = []
    unfrozen = False
    stop_reason = "max_epochs"
    for epoch in range(1, cfg.train.epochs + 1):
        if should_unfreeze(cfg, epoch, stopper, unfrozen):
            unfreeze(accelerator.unwrap_model(model), cfg.unfreeze.layers)
            model = rewrap_after_unfreeze(accelerator, model)
            unfrozen = True
            accelerator.print(f"epoch {epoch}: unfreezing {cfg.unfreeze.layers}")
        lrs = [group["lr"] for group in optimizer.param_groups]

        started = time.perf_counter()
        train_stats = train_one_epoch(accelerator, model, train_loader, optimizer, class_weights, epoch)
        train_seconds = time.perf_counter() - started
        val = validate(accelerator, model, val_loader, class_weights)

        scheduler.step(val.loss)
        improved = stopper.update(val.loss, epoch)
        if improved and accelerator.is_main_process:
            checkpoint.save_best(
                accelerator.unwrap_model(model),
                run.path / "best",
                best_meta(cfg, split.classes, epoch, val),
            )
        row = {
            "epoch": epoch,
            "train_loss": train_stats.loss,
            "train_acc": train_stats.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "lr": lrs,
            "lr_groups": [group["name"] for group in optimizer.param_groups],
            "unfrozen": trainable_stages(accelerator.unwrap_model(model)),
            "world_size": accelerator.num_processes,
            "epoch_seconds": time.perf_counter() - started,
            "train_images_per_second": train_stats.images / train_seconds,
        }
        rows.append(row)
        run.append_metrics(row)
        accelerator.print(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  lr {lrs[0]:.2e}"
            + ("  *best" if improved else "")
        )
        if not math.isfinite(val.loss):
            stop_reason = "non_finite_val_loss"
            break
        if stopper.should_stop:
            stop_reason = "early_stopping"
            break

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
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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

"""Checkpoints, one component: the full training state for resume, the best-model export, and
the checks that a checkpoint fits the run that loads it. Every directory is published atomically.

A training checkpoint (``RUN/checkpoints/epoch-NNNN[-step-SSSSSS]``) is ``accelerator.save_state``
(model, optimizer, plateau scheduler, per-rank RNG states, and the registered early-stopping and
progress objects) written into a hidden temporary directory and renamed into place by the main
process once every rank has written its part; a run killed mid-save leaves only the temporary
directory, which resume ignores and the next save removes. The best model (``RUN/best``) is
safetensors weights plus ``meta.json``: what :mod:`anemia_dist.inference` needs to use it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .config import Config
from .errors import CheckpointMismatch, ConfigError
from .metrics import OperatingPoint
from .model import preprocessing
from .progress import TrainingProgress
from .run_dir import BEST, CHECKPOINT_INFO, CHECKPOINTS, META, WEIGHTS

PREFIX = "epoch-"
TMP_PREFIX = ".tmp-"


def checkpoint_name(progress: TrainingProgress) -> str:
    """Sorts in training order: ``epoch-0003`` < ``epoch-0003-step-000012`` < ``epoch-0004``."""
    name = f"{PREFIX}{progress.epoch:04d}"
    return name if progress.step == 0 else f"{name}-step-{progress.step:06d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints every rank finished writing, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(PREFIX) and (p / CHECKPOINT_INFO).is_file())


def read_info(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint.json``: the identity it was written for, the progress, the world size."""
    return json.loads((checkpoint / CHECKPOINT_INFO).read_text())


class Checkpointer:
    """Saves and restores one run's checkpoints and exports its best model.

    ``save`` and ``restore`` are called on every rank (``save_state`` synchronises and each rank
    writes its own RNG state); ``save_best`` writes on the main process only.
    """

    def __init__(self, accelerator: Accelerator, run_path: Path, cfg: Config, classes: list[str]):
        self.accelerator = accelerator
        self.directory = Path(run_path) / CHECKPOINTS
        self.best_directory = Path(run_path) / BEST
        self.keep_last = cfg.checkpoint.keep_last
        self.resume = cfg.run.resume
        self.identity = {
            "arch": cfg.model.arch,
            "classes": classes,
            "hidden": cfg.model.hidden,
            "unfreeze_layers": cfg.unfreeze.layers,
        }
        """What a checkpoint's tensors depend on: resuming with anything else is refused."""
        backbone = preprocessing(cfg.model.arch)
        self.model_meta = {
            "arch": cfg.model.arch,
            "classes": classes,
            "image_size": cfg.data.image_size,
            "alpha_background": cfg.data.alpha_background,
            "hidden": cfg.model.hidden,
            "dropout": cfg.model.dropout,
            "normalization": {"mean": backbone["mean"], "std": backbone["std"]},
            "pretrained_input_size": backbone["pretrained_input_size"],
        }
        """What inference needs to rebuild the model and feed it as training did."""

    # ------------------------------------------------------------------ resume

    def resume_point(self) -> Path | None:
        """``run.resume``: ``auto`` is the newest complete checkpoint (or none); a path is that checkpoint."""
        if self.resume is None:
            return None
        if self.resume == "auto":
            found = complete_checkpoints(self.directory)
            return found[-1] if found else None
        path = Path(self.resume)
        if not (path / CHECKPOINT_INFO).is_file():
            raise ConfigError(
                f"run.resume: {self.resume!r} is not a complete checkpoint (no {CHECKPOINT_INFO}); "
                f"use auto or a path under RUN/{CHECKPOINTS}/"
            )
        return path

    def track(self, *objects: Any) -> None:
        """Save and restore these (``state_dict``/``load_state_dict``) with the model and optimizer."""
        self.accelerator.register_for_checkpointing(*objects)

    def restore(
        self, checkpoint: Path, model: torch.nn.Module, unfreeze: Callable[[torch.nn.Module], torch.nn.Module]
    ) -> torch.nn.Module:
        """Give the model the shape it had when saved (``unfreeze``: its stages and DDP wrapper),
        then load every saved and tracked state into it; returns the model to train on."""
        self._check_identity(checkpoint)
        if read_info(checkpoint)["progress"]["unfrozen"]:
            model = unfreeze(model)
        self.accelerator.load_state(str(checkpoint))
        return model

    def _check_identity(self, checkpoint: Path) -> None:
        """No silent partial load: the model shape and the class list must be the ones saved."""
        saved = read_info(checkpoint)["identity"]
        differences = [
            f"{key}: checkpoint has {saved.get(key)!r}, this config has {value!r}"
            for key, value in self.identity.items()
            if saved.get(key) != value
        ]
        if differences:
            raise CheckpointMismatch(
                f"{checkpoint}: written for a different setup; "
                + "; ".join(differences)
                + ". Resume with the run's own config.yaml, or start a new run.name."
            )

    # ------------------------------------------------------------------ save

    def save(self, progress: TrainingProgress, best_epoch: int) -> Path:
        """The full training state as of ``progress``; keeps the newest ``checkpoint.keep_last`` and
        the best epoch's. Returns the checkpoint's directory."""
        accelerator = self.accelerator
        final = self.directory / checkpoint_name(progress)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            info = {
                "identity": self.identity,
                "progress": progress.state_dict(),
                "world_size": accelerator.num_processes,
            }
            (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
            _publish(tmp, final)
            self._prune(keep={final.name, f"{PREFIX}{best_epoch:04d}"})
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: set[str]) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best epoch's; drop leftovers of killed saves."""
        complete = complete_checkpoints(self.directory)
        keep |= {p.name for p in complete[-self.keep_last :]}
        for path in self.directory.iterdir():
            if path.name.startswith(TMP_PREFIX) or (path.name.startswith(PREFIX) and path.name not in keep):
                shutil.rmtree(path, ignore_errors=True)

    def save_best(
        self, model: torch.nn.Module, epoch: int, val_loss: float, val_acc: float, point: OperatingPoint
    ) -> None:
        """Export ``RUN/best``: contiguous CPU weights, and in ``meta.json`` the architecture, class names
        in index order, preprocessing, the epoch with its validation loss and accuracy, and the
        operating point that ``evaluate`` and ``predict`` apply unchanged."""
        if not self.accelerator.is_main_process:
            return
        weights = self.accelerator.unwrap_model(model).state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        meta = {
            **self.model_meta,
            "epoch": epoch,
            "val_loss": val_loss,
            "val_acc": val_acc,
            **point.to_meta(),
        }
        with _atomic_directory(self.best_directory) as tmp:
            save_file(state, str(tmp / WEIGHTS))
            (tmp / META).write_text(json.dumps(meta, indent=2))


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then swap it in: a crash leaves the old directory intact."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    """Flush a fully written ``tmp`` to disk and rename it to ``target``, replacing any old one."""
    for written in tmp.iterdir():
        if written.is_file():
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)

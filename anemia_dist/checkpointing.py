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
from safetensors import SafetensorError
from safetensors.torch import save_file

from .config import Config
from .distributed import any_rank, broadcast_from_main
from .errors import CheckpointMismatch, ConfigError, DiskSpaceError, UserError
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
    writes its own RNG state); ``save_best`` is called on every rank and writes on the main process.
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
        self.needed_bytes = 0
        """What this run's checkpoints take at most on disk (:meth:`require_space`)."""
        self.resume_info: dict[str, Any] = {}
        """The resumed checkpoint's ``checkpoint.json`` as the main process read it."""

    # ------------------------------------------------------------------ resume

    def resume_point(self) -> Path | None:
        """``run.resume``: ``auto`` is the newest complete checkpoint (or none); a path is that checkpoint.

        Decided on the main process, checked there (identity, world size) and sent to every rank
        with the checkpoint's ``checkpoint.json``: on a shared file system with stale listings,
        ranks deciding for themselves could load different checkpoints. A refusal is raised on
        every rank alike.
        """
        decision: tuple[Path, dict[str, Any]] | UserError | None = None
        if self.accelerator.is_main_process:
            try:
                decision = self._choose_resume()
            except UserError as error:
                decision = error
        decision = broadcast_from_main(decision)
        if isinstance(decision, UserError):
            raise decision
        if decision is None:
            return None
        path, self.resume_info = decision
        return path

    def _choose_resume(self) -> tuple[Path, dict[str, Any]] | None:
        if self.resume is None:
            return None
        if self.resume == "auto":
            found = complete_checkpoints(self.directory)
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(self.resume)
        if not (path / CHECKPOINT_INFO).is_file():
            raise ConfigError(
                f"run.resume: {self.resume!r} is not a complete checkpoint (no {CHECKPOINT_INFO}); "
                f"use auto or a path under RUN/{CHECKPOINTS}/"
            )
        info = read_info(path)
        self._check_identity(path, info["identity"])
        self._check_world_size(path, info)
        return path, info

    def _check_world_size(self, checkpoint: Path, info: dict[str, Any]) -> None:
        """A mid-epoch checkpoint continues its epoch with the sharding it was written under:
        at another world size the rest of the epoch would skip some images and repeat others."""
        saved, now, progress = info["world_size"], self.accelerator.num_processes, info["progress"]
        if progress["step"] == 0 or saved == now:
            return
        epochs = [p for p in complete_checkpoints(checkpoint.parent) if p.name == f"{PREFIX}{progress['epoch']:04d}"]
        instead = f"run.resume={epochs[-1]}" if epochs else "a new run.name (no epoch checkpoint is left to resume)"
        raise CheckpointMismatch(
            f"{checkpoint}: a mid-epoch checkpoint written by {saved} processes cannot continue its epoch on "
            f"{now}; resume it with {saved} processes, or resume from the last epoch checkpoint with {instead}"
        )

    def track(self, *objects: Any) -> None:
        """Save and restore these (``state_dict``/``load_state_dict``) with the model and optimizer."""
        self.accelerator.register_for_checkpointing(*objects)

    def restore(
        self, checkpoint: Path, model: torch.nn.Module, unfreeze: Callable[[torch.nn.Module], torch.nn.Module]
    ) -> torch.nn.Module:
        """Give the model the shape it had when saved (``unfreeze``: its stages and DDP wrapper),
        then load every saved and tracked state into it; returns the model to train on.
        ``checkpoint`` is what :meth:`resume_point` returned, its info the main process's."""
        if self.resume_info["progress"]["unfrozen"]:
            model = unfreeze(model)
        self.accelerator.load_state(str(checkpoint))
        return model

    def _check_identity(self, checkpoint: Path, saved: dict[str, Any]) -> None:
        """No silent partial load: the model shape and the class list must be the ones saved."""
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
        with self._written_together(tmp):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        with self._written_together(tmp), _scaler_on_main_only(accelerator):
            accelerator.save_state(str(tmp))
        with self._written_together(tmp):
            if accelerator.is_main_process:
                info = {
                    "identity": self.identity,
                    "progress": progress.state_dict(),
                    "world_size": accelerator.num_processes,
                }
                (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
                _publish(tmp, final)
                self._prune(keep={final.name, f"{PREFIX}{best_epoch:04d}"})
        return final

    # ------------------------------------------------------------------ disk space

    def require_space(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before training: stop now if the checkpoints this run will hold cannot fit (main decides).

        At most ``keep_last`` checkpoints, the best epoch's and one being written, each the
        weights plus Adam's two moments of every parameter it trains, and ``best/`` twice (the old
        one stays until the new one is complete); less what the run directory already holds.
        """
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        moments = 2 * sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
        self.needed_bytes = (self.keep_last + 2) * (weights + moments) + 2 * weights
        problem = None
        if self.accelerator.is_main_process:
            held = sum(f.stat().st_size for d in (self.directory, self.best_directory) for f in _files(d))
            free = shutil.disk_usage(self.directory.parent).free
            if free + held < self.needed_bytes:
                problem = DiskSpaceError(
                    f"{self.directory.parent}: not enough free space for this run's checkpoints: about "
                    f"{_size(self.needed_bytes)} needed (checkpoint.keep_last={self.keep_last} checkpoints of "
                    f"{_size(weights + moments)}, the best epoch's, one being written, and best/), {_size(free)} "
                    f"free. Free some space, lower checkpoint.keep_last or choose another run.output_dir."
                )
        problem = broadcast_from_main(problem)
        if problem is not None:
            raise problem

    @contextmanager
    def _written_together(self, partial: Path | None) -> Iterator[None]:
        """A write on any rank that fails (a full disk, a quota, a lost mount) ends every rank with
        the same message, after the main process removes the partial directory. No collective
        may run inside: the ranks meet in the all-reduce that follows."""
        failure: Exception | None = None
        try:
            yield
        except (OSError, RuntimeError, SafetensorError) as error:  # how torch and safetensors report them
            failure = error
        if not any_rank(self.accelerator, failure is not None):
            return
        if self.accelerator.is_main_process and partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        complete = complete_checkpoints(self.directory)
        last = complete[-1] if complete else f"none yet ({self.best_directory} holds the best epoch's model if any)"
        raise DiskSpaceError(
            f"could not write under {self.directory.parent}"
            + (f" ({failure})" if failure is not None else " (on another rank)")
            + f"; this run's checkpoints need about {_size(self.needed_bytes)}; the last complete checkpoint is "
            f"{last}. Free some space (or lower checkpoint.keep_last), then continue with run.resume=auto."
        ) from failure

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
        operating point that ``evaluate`` and ``predict`` apply unchanged. Called on every rank
        (a failed write ends them all); the main process writes."""
        with self._written_together(None):
            if self.accelerator.is_main_process:
                self._export_best(model, epoch, val_loss, val_acc, point)

    def _export_best(
        self, model: torch.nn.Module, epoch: int, val_loss: float, val_acc: float, point: OperatingPoint
    ) -> None:
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
def _scaler_on_main_only(accelerator: Accelerator) -> Iterator[None]:
    """fp16: Accelerate's ``save_state`` has every rank write ``scaler.pt`` into the shared folder
    (the same state: DDP's all-reduced gradients give every rank's scaler the same inf checks);
    the other ranks save without it. Each rank still loads it on resume."""
    scaler = accelerator.scaler
    if not accelerator.is_main_process:
        accelerator.scaler = None
    try:
        yield
    finally:
        accelerator.scaler = scaler


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


def _files(directory: Path) -> Iterator[Path]:
    return (f for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else iter(())


def _size(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB" if count >= 2**20 else f"{count:,.0f} bytes"


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

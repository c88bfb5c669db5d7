"""Full training state in ``RUN/checkpoints/``: written atomically, found again on resume.

Each checkpoint is ``accelerator.save_state`` (model, optimizer, plateau scheduler, per-rank
RNG states, and the registered early-stopping and progress objects) into a hidden temporary
directory, renamed into place by the main process once every rank has written its part. A run
killed mid-save leaves only the temporary directory, which resume ignores.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .checkpoint import publish_directory
from .config import ConfigError

INFO_FILE = "checkpoint.json"
PREFIX = "epoch-"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainingProgress:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0
    """Last completed epoch."""
    step: int = 0
    """Batches already trained in epoch ``epoch + 1`` (non-zero only for a preemption checkpoint)."""
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    """Global training totals (Σw·ℓ, Σw, correct, n) of those batches."""
    partial_seconds: float = 0.0
    unfrozen: bool = False
    tracker_run_id: str | None = None
    """The W&B run id (a resumed run continues that run)."""
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class CheckpointMismatch(ConfigError):
    """The checkpoint was written for a different model or classes."""


def checkpoint_name(progress: TrainingProgress) -> str:
    """Sorts in training order: ``epoch-0003`` < ``epoch-0003-step-000012`` < ``epoch-0004``."""
    name = f"{PREFIX}{progress.epoch:04d}"
    return name if progress.step == 0 else f"{name}-step-{progress.step:06d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(PREFIX) and (p / INFO_FILE).is_file())


def read_info(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / INFO_FILE).read_text())


def check_compatible(checkpoint: Path, identity: dict[str, Any]) -> None:
    """No silent partial load: the model shape and the class list must be the ones saved."""
    saved = read_info(checkpoint)["identity"]
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, this config has {value!r}"
        for key, value in identity.items()
        if saved.get(key) != value
    ]
    if differences:
        raise CheckpointMismatch(
            f"{checkpoint}: written for a different setup; "
            + "; ".join(differences)
            + ". Resume with the run's own config.yaml, or start a new run.name."
        )


def resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    """``auto``: the newest complete checkpoint, or none; a path: that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoints)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / INFO_FILE).is_file():
        raise ConfigError(
            f"run.resume: {resume!r} is not a complete checkpoint (no {INFO_FILE}); use auto or a path under RUN/checkpoints/"
        )
    return path


class Checkpointer:
    def __init__(self, accelerator: Accelerator, directory: Path, keep_last: int, identity: dict[str, Any]):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.identity = identity

    def save(self, progress: TrainingProgress, best_epoch: int) -> Path:
        """Called on every rank (``save_state`` synchronises and each rank writes its RNG state)."""
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
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
            publish_directory(tmp, final)
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

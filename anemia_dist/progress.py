"""Where training stands: the last finished epoch, the step within the next one, and the running
loss and accuracy totals; saved in every checkpoint, so a resumed run continues exactly."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Totals:
    """Running class-weighted loss and accuracy over the batches seen: the epoch's train_loss is
    Σ w_y·ℓ / Σ w_y and its train_acc correct / n, the same formulas as validation's."""

    weighted_loss: float = 0.0
    """Σ w_y·ℓ: each sample's cross-entropy times its class weight."""
    weight: float = 0.0
    """Σ w_y."""
    correct: float = 0.0
    seen: float = 0.0
    """n: images counted, each once per epoch (the padding of the last round is not counted)."""

    @property
    def loss(self) -> float:
        return self.weighted_loss / self.weight

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        """As a float64 [4] tensor, the layout :func:`batch_totals` adds to on the device."""
        return torch.tensor(list(astuple(self)), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, totals: torch.Tensor) -> Totals:
        return cls(*totals.tolist())


@torch.no_grad()
def batch_totals(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """One batch's :class:`Totals` as a float64 [4] tensor on the device: adding it up costs no
    wait for the device and no copy from the host."""
    weights = class_weights[labels]
    return torch.stack(
        [
            (weights * F.cross_entropy(logits.float(), labels, reduction="none")).sum().double(),
            weights.sum().double(),
            (logits.argmax(1) == labels).sum().double(),
            labels.new_full((), len(labels), dtype=torch.float64),  # filled there: no copy, no wait
        ]
    )


@dataclass
class TrainingProgress:
    """Where the loop is; registered for checkpointing (``state_dict``/``load_state_dict``)."""

    epoch: int = 0
    """Last completed epoch."""
    step: int = 0
    """Batches already trained in epoch ``epoch + 1`` (non-zero only for a preemption checkpoint)."""
    partial: Totals = field(default_factory=Totals)
    """Global training totals of those batches."""
    partial_seconds: float = 0.0
    unfrozen: bool = False
    tracker_run_id: str | None = None
    """The W&B run id (a resumed run continues that run)."""
    mlflow_run_id: str | None = None

    def pause(self, step: int, totals: Totals, seconds: float) -> None:
        """Stopped after ``step`` batches of epoch ``epoch + 1``: what a preemption checkpoint carries."""
        self.step, self.partial, self.partial_seconds = step, totals, seconds

    def complete(self, epoch: int) -> None:
        """``epoch`` has finished: the next one starts at its first batch."""
        self.epoch, self.step, self.partial, self.partial_seconds = epoch, 0, Totals(), 0.0

    def state_dict(self) -> dict[str, Any]:
        """Plain values; the totals as the list [Σw·ℓ, Σw, correct, n]."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "partial": list(astuple(self.partial)),
            "partial_seconds": self.partial_seconds,
            "unfrozen": self.unfrozen,
            "tracker_run_id": self.tracker_run_id,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, Totals(*value) if key == "partial" else value)

"""What the network learns: the classes (``model.task=classify``, the methodology) or the
haemoglobin value (``model.task=regress``), each with its targets, loss, validation pass,
per-epoch metrics and what ``best/meta.json`` records.

The trainer runs either through the same calls, so the splits, the frozen backbone and its
unfreezing, the plateau scheduler, early stopping on the exact synced validation loss,
checkpoints and resume are those of the methodology in both. Regression targets are the
measurement standardised with the training split's mean and SD; each target row also carries the
row's threshold on that scale, so a batch can count correct anemic decisions (predicted < threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .config import Config
from .console import progress_bar
from .datasets import device_transform
from .errors import DataError
from .metrics import OperatingPoint, positive_index, screening_metrics
from .progress import batch_totals
from .regression_metrics import agreement_table, conformal_radius, fit_recalibration, screening_at
from .sources import Sample
from .splits import SplitData
from .torch_settings import any_batch_size
from .validation import ValidationResult, validate

REGRESS = "regress"


@dataclass(frozen=True)
class HbScale:
    """The training split's mean and SD of the measurement: targets are (value − mean) / sd."""

    mean: float
    sd: float

    @classmethod
    def fit(cls, samples: Sequence[Sample]) -> HbScale:
        values = np.array([s.value for s in samples], dtype=np.float64)
        if not len(values) or not np.isfinite(values).all():
            raise DataError("model.task=regress: every training image needs a measurement (data.measure_column)")
        sd = float(values.std())
        return cls(float(values.mean()), sd if sd > 0 else 1.0)

    def standardise(self, values: Any) -> torch.Tensor:
        return (torch.as_tensor(values, dtype=torch.float64) - self.mean) / self.sd

    def restore(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() * self.sd + self.mean


@dataclass
class RegressionResult(ValidationResult):
    """:class:`ValidationResult` with the values in g/dL; ``labels`` are anemic (the positive class)
    by the measurement and ``probs`` one-hot decisions by the prediction, both at the row thresholds."""

    predicted: np.ndarray | None = None
    measured: np.ndarray | None = None
    thresholds: np.ndarray | None = None


@dataclass
class HbPoint:
    """What ``best/meta.json`` holds for a regression model: the target scale, the decision rule,
    the recalibration and the conformal interval radius, all fitted on validation."""

    scale: HbScale
    positive_class: str
    slope: float = 1.0
    intercept: float = 0.0
    interval: float = 0.9
    radius: float = math.inf
    threshold: float | None = None
    """data.threshold: the threshold ``predict`` applies to files without a manifest row."""
    cut_offs: tuple[float, ...] = ()
    """eval.hb_thresholds: the severity cut-offs every report adds (``evaluate`` may override them)."""

    def to_meta(self) -> dict[str, Any]:
        return {
            "task": REGRESS,
            "threshold": self.threshold,
            "hb_thresholds": list(self.cut_offs),
            "hb_mean": self.scale.mean,
            "hb_sd": self.scale.sd,
            "positive_class": self.positive_class,
            "threshold_rule": "predicted < row threshold",
            "calibration": {"slope": self.slope, "intercept": self.intercept},
            "interval": self.interval,
            "interval_radius": self.radius if math.isfinite(self.radius) else None,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> HbPoint:
        calibration = meta.get("calibration") or {"slope": 1.0, "intercept": 0.0}
        radius = meta.get("interval_radius")
        return cls(
            HbScale(meta["hb_mean"], meta["hb_sd"]),
            meta["positive_class"],
            calibration["slope"],
            calibration["intercept"],
            meta.get("interval", 0.9),
            math.inf if radius is None else radius,
            meta.get("threshold"),
            tuple(meta.get("hb_thresholds", ())),
        )

    def calibrated(self, predicted: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(predicted, dtype=np.float64) + self.intercept


class ClassifyTask:
    """The methodology: class-weighted cross-entropy over the classes."""

    name = "classify"

    def __init__(self, cfg: Config, split: SplitData):
        self.cfg, self.classes = cfg, split.classes

    def outputs(self) -> int:
        return len(self.classes)

    def targets(self, split: SplitData) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-sample targets for the loaders; None: the class labels."""
        return None

    def sample_losses(
        self, outputs: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's loss and weight: cross-entropy, weighted by its class."""
        return F.cross_entropy(outputs.float(), targets, reduction="none"), class_weights[targets]

    def batch_totals(self, outputs: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        return batch_totals(outputs, targets, class_weights)

    def validate(
        self, accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, class_weights: torch.Tensor
    ) -> ValidationResult:
        return validate(accelerator, model, loader, class_weights)

    def epoch_metrics(self, val: ValidationResult) -> tuple[OperatingPoint, dict[str, float]]:
        """The operating point this epoch's model would be saved with, and the ``val_*`` columns."""
        return screening_metrics(val.labels, val.probs, self.classes, self.cfg.eval)


class RegressTask(ClassifyTask):
    """Haemoglobin in g/dL: one output, Huber loss on the standardised value (delta in SD units)."""

    name = REGRESS

    def __init__(self, cfg: Config, split: SplitData):
        super().__init__(cfg, split)
        self.scale = HbScale.fit(split.train)
        self.delta = cfg.optim.huber_delta
        self.positive = positive_index(split.classes, cfg.eval.positive_class)
        self.val_groups = [s.unit or s.group for s in split.val]
        self.threshold = cfg.data.threshold

    def outputs(self) -> int:
        return 1

    def targets(self, split: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, 2] float32: the standardised measurement and the row's threshold on the same scale."""

        def columns(part: Sequence[Sample]) -> torch.Tensor:
            values = [self.scale.standardise([getattr(s, key) for s in part]) for key in ("value", "threshold")]
            return torch.stack(values, dim=1).float()

        return columns(split.train), columns(split.val)

    def sample_losses(
        self, outputs: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's Huber loss on the standardised value, all weighted alike."""
        losses = F.huber_loss(outputs.float()[:, 0], targets[:, 0], delta=self.delta, reduction="none")
        return losses, torch.ones_like(losses)

    @torch.no_grad()
    def batch_totals(self, outputs: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """:class:`~anemia_dist.progress.Totals`: Σ Huber, n, correct anemic decisions, n."""
        predicted, measured, threshold = outputs.float()[:, 0], targets[:, 0], targets[:, 1]
        seen = targets.new_full((), len(targets), dtype=torch.float64)
        correct = ((predicted < threshold) == (measured < threshold)).sum().double()
        loss = F.huber_loss(predicted, measured, delta=self.delta, reduction="sum").double()
        return torch.stack([loss, seen, correct, seen])

    @torch.no_grad()
    def validate(
        self, accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, class_weights: torch.Tensor
    ) -> RegressionResult:
        """Every validation image's prediction exactly once (``gather_for_metrics``), identical on every
        rank; the loss is the mean Huber loss in SD units, summed in float64 on the host."""
        z, target = gather_outputs(accelerator, model, loader)
        loss = float(F.huber_loss(z, target[:, 0], delta=self.delta, reduction="sum") / len(z))
        predicted, measured, thresholds = (self.scale.restore(t).numpy() for t in (z, target[:, 0], target[:, 1]))
        truth, decision = measured < thresholds, predicted < thresholds
        labels = torch.as_tensor(np.where(truth, self.positive, 1 - self.positive))
        probs = torch.nn.functional.one_hot(torch.as_tensor(np.where(decision, self.positive, 1 - self.positive)), 2)
        accuracy = float((truth == decision).mean())
        return RegressionResult(loss, accuracy, labels, probs.double(), predicted, measured, thresholds)

    def epoch_metrics(self, val: RegressionResult) -> tuple[HbPoint, dict[str, float]]:
        """val_mae, val_rmse, val_bias and the screening metrics of "predicted < row threshold"; the
        point: recalibration (eval.calibrate) and the conformal radius, fitted on these predictions."""
        slope, intercept = fit_recalibration(val.measured, val.predicted) if self.cfg.eval.calibrate else (1.0, 0.0)
        point = HbPoint(
            self.scale,
            self.classes[self.positive],
            slope,
            intercept,
            self.cfg.eval.interval,
            threshold=self.threshold,
            cut_offs=tuple(self.cfg.eval.hb_thresholds),
        )
        calibrated = point.calibrated(val.predicted)
        point.radius = conformal_radius(val.measured - calibrated, self.val_groups, self.cfg.eval.interval)
        table = agreement_table(val.measured, val.predicted, np.ones((1, len(val.measured))))
        errors = {name: float(table[name][0]) for name in ("mae", "rmse", "bias")}
        return point, errors | screening_at(val.measured, val.predicted, val.thresholds)


@torch.no_grad()
def gather_outputs(
    accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's single output and its target row, each exactly once and in loader order
    (``gather_for_metrics`` drops the distributed sampler's padding), float64 on the host."""
    model.eval()
    outputs, targets = [], []
    transform = device_transform(loader)
    for images, target in progress_bar(accelerator, loader, "validate"):
        output = model(any_batch_size(transform(images))).float()[:, 0]
        output, target = accelerator.gather_for_metrics((output, target))
        outputs.append(output.double())
        targets.append(target.double())
    return torch.cat(outputs).cpu(), torch.cat(targets).cpu()  # one copy to the host for the whole set


def make_task(cfg: Config, split: SplitData) -> ClassifyTask:
    """``model.task``'s implementation for this split."""
    return RegressTask(cfg, split) if cfg.model.task == REGRESS else ClassifyTask(cfg, split)

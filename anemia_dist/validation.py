"""The validation pass: every sample's probabilities exactly once, identical on every rank.

Training validates with it each epoch and ``evaluate`` scores held-out data with it, so both
see the same numbers on 1..N processes; it imports nothing from the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .console import progress_bar
from .datasets import device_transform
from .torch_settings import any_batch_size


@dataclass
class ValidationResult:
    """Every validation sample exactly once, identical on every rank."""

    loss: float
    accuracy: float
    labels: torch.Tensor
    probs: torch.Tensor


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
    rows = []  # per batch, one row per sample: loss, label, probabilities (labels are exact in float64)
    bar = progress_bar(accelerator, loader, "validate")
    transform = device_transform(loader)
    for images, targets in bar:
        logits = model(any_batch_size(transform(images))).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss, targets, prob = accelerator.gather_for_metrics((loss, targets, logits.softmax(dim=1)))
        rows.append(torch.cat([loss.double()[:, None], targets.double()[:, None], prob.double()], dim=1))
    # One copy to the host for the whole set, not a wait for the device per batch.
    table = torch.cat(rows).cpu()
    loss, labels_all, probs_all = table[:, 0], table[:, 1].long(), table[:, 2:]
    weights = class_weights.double().cpu()[labels_all]
    weighted = float((weights * loss).sum() / weights.sum())
    accuracy = float((probs_all.argmax(1) == labels_all).double().mean())
    return ValidationResult(weighted, accuracy, labels_all, probs_all)

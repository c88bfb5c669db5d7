"""Grad-CAM on a trained model: the heat lies on the part of the picture the label depends on.
(Trains a tiny ResNet in process for a few seconds.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anemia_dist.config import ModelConfig
from anemia_dist.explain import grad_cam, heat_at
from anemia_dist.model import build_model

pytestmark = pytest.mark.multiprocess

SIDE = 128  # layer4 is then 4x4 cells


def tinted(rng: np.random.Generator, count: int, half: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise pictures whose ``half`` (left or right) is tinted red (label 1) or blue (label 0);
    the other half is noise that says nothing about the label."""
    pixels = rng.normal(128, 30, (count, SIDE, SIDE, 3))
    labels = rng.integers(0, 2, count)
    columns = slice(0, SIDE // 2) if half == "left" else slice(SIDE // 2, SIDE)
    for index, label in enumerate(labels):
        pixels[index, :, columns] += (60, -40, -40) if label else (-40, -40, 60)
    images = torch.tensor(np.clip(pixels, 0, 255) / 255.0, dtype=torch.float32).permute(0, 3, 1, 2)
    return (images - 0.45) / 0.25, torch.tensor(labels)


def left_share(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Per picture, the fraction of the heat-map's mass in the left half."""
    with torch.no_grad():
        called = model(images).softmax(dim=1)[:, 1] >= 0.5
    cams = grad_cam(model, images, 1, called).numpy()
    heats = [heat_at(cam, (SIDE, SIDE)) for cam in cams]
    return np.array([heat[:, : SIDE // 2].sum() / heat.sum() for heat in heats])


def test_the_heat_lies_in_the_region_the_label_depends_on():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, labels = tinted(rng, 64, "left")
    model = build_model(ModelConfig(arch="resnet18", weights="none", hidden=16, dropout=0.0), 2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(8):
        batch = torch.randint(0, len(images), (16,))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = tinted(rng, 16, "left")
    with torch.no_grad():
        assert (model(test_images).argmax(dim=1) == test_labels).float().mean() == 1.0
    assert left_share(model, test_images).min() > 0.6  # chance: 0.5
    # control: the same evidence in the other half moves the heat there
    mirrored, _ = tinted(rng, 16, "right")
    assert left_share(model, mirrored).max() < 0.4

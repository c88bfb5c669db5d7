"""Grad-CAM heat-maps: where in a photo the model found the evidence for its decision, drawn over
the photo so a clinician can check it (``predict --explain`` and the reports' error galleries).

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last backbone stage (``layer4`` of
a ResNet, the final stage of a timm convolutional backbone)
by the mean gradient of the target score over the map, sums the weighted channels and keeps the
positive part. The target score is the log-odds of the decision the saved threshold gives: log
P(positive) / (1 − P(positive)) for an image called positive, its negative otherwise, so the map
shows what pushed the model towards what it decided (the temperature only rescales it).

Written with a forward hook and ``torch.autograd.grad`` rather than pytorch-grad-cam: for one
method on one layer of a ResNet this is the twenty lines of :func:`grad_cam`, while the library
would make OpenCV, ttach and scikit-learn dependencies of every training run (the validation
report draws these maps at the end of training), and its OpenCV resize lays the map half a cell
off the photo (:func:`_cell_weights`). A test checks that the cell maps of the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torchvision
from PIL import Image

from .backbones import TimmClassifier
from .errors import ConfigError
from .images import load_rgb
from .metrics import OperatingPoint
from .model import backbone_stages

HEATMAP_OPACITY = 0.45
COLOUR_MAP = "jet"


def target_stage(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone's last stage (``layer4`` of a ResNet; timm's final stage, e.g. ``stages.3``):
    the finest map that has seen the whole picture."""
    root = model.backbone if isinstance(model, TimmClassifier) else model
    return root.get_submodule(list(backbone_stages(model))[-1])


def cells_centred_on_strides(model: torch.nn.Module) -> bool:
    """Whether cell i of the last stage is centred on input pixel stride·i (a torchvision ResNet,
    see :func:`_cell_weights`) rather than stride·(i + ½) (patchifying backbones such as ConvNeXt)."""
    return isinstance(model, torchvision.models.ResNet)


def grad_cam(
    model: torch.nn.Module, inputs: torch.Tensor, positive: int, called_positive: torch.Tensor
) -> torch.Tensor:
    """Heat-maps [N, h, w] in 0..1 at ``layer4``'s resolution for normalised ``inputs`` [N, 3, S, S].

    ``called_positive`` (bool [N]): the decision at the saved threshold, whose evidence is mapped.
    """
    stage = target_stage(model)
    captured: list[torch.Tensor] = []
    handle = stage.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = model(inputs.detach().requires_grad_(True)).float()
            others = torch.cat([logits[:, :positive], logits[:, positive + 1 :]], dim=1)
            log_odds = logits[:, positive] - others.logsumexp(dim=1)
            target = torch.where(called_positive.to(log_odds.device), log_odds, -log_odds)
            (gradients,) = torch.autograd.grad(target.sum(), captured[0])
    finally:
        handle.remove()
    activations = captured[0].detach().float()
    if activations.ndim != 4:
        raise ConfigError(
            f"Grad-CAM needs a last stage with a spatial map [N, C, H, W]; this backbone's gives "
            f"{list(activations.shape)} (a transformer's tokens): no heat-maps for it"
        )
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1))
    cam = cam - cam.flatten(1).amin(dim=1)[:, None, None]  # scaled to 0..1 per image, as pytorch-grad-cam does
    return (cam / (cam.flatten(1).amax(dim=1)[:, None, None] + 1e-7)).cpu()


def _cell_weights(pixels: int, cells: int, centre: float) -> np.ndarray:
    """[pixels, cells] linear-interpolation weights along one side of the photo.

    The photo is resized to the model's input without keeping its aspect ratio, so the centre of
    photo pixel x sits at (x + ½)·cells/pixels in units of cells. A torchvision ResNet's cell i is
    centred on input pixel stride·i, not stride·(i + ½): its stride-2 convolutions (kernel 3 or 7,
    padding 1 or 3) centre output i on input 2i. Placing the cells half a cell off, as a plain
    image resize does, shifts the whole map by half a cell (16 pixels at 224 px) towards the
    bottom right (up to a sub-pixel term, half an input pixel). ``centre``: where in its cell a
    cell's centre lies (0 for a ResNet, ½ for a backbone whose cells tile the input).
    """
    cell = np.clip((np.arange(pixels) + 0.5) * cells / pixels - centre, 0, cells - 1)  # pixel centres, in cells
    low = np.floor(cell).astype(int)
    high = np.minimum(low + 1, cells - 1)
    fraction = cell - low
    weights = np.zeros((pixels, cells))
    np.add.at(weights, (np.arange(pixels), low), 1 - fraction)
    np.add.at(weights, (np.arange(pixels), high), fraction)
    return weights


def heat_at(cam: np.ndarray, size: tuple[int, int], centre: float = 0.0) -> np.ndarray:
    """``cam`` [cells_y, cells_x] as a heat-map of ``size`` (width, height) with each cell over the
    part of the photo it is centred on (:func:`_cell_weights`)."""
    width, height = size
    rows, columns = _cell_weights(height, cam.shape[0], centre), _cell_weights(width, cam.shape[1], centre)
    return rows @ cam.astype(np.float64) @ columns.T


def overlay(photo: Image.Image, cam: np.ndarray, centre: float = 0.0) -> Image.Image:
    """The heat-map in colour over the photo, at the photo's size; a new image (no EXIF, no metadata)."""
    heat = np.clip(heat_at(cam, photo.size, centre), 0.0, 1.0).astype(np.float32)
    colours = matplotlib.colormaps[COLOUR_MAP](heat, bytes=True)[..., :3]  # uint8: a 12-megapixel photo stays small
    mixed = (1 - HEATMAP_OPACITY) * np.asarray(photo.convert("RGB"), dtype=np.float32)
    mixed += HEATMAP_OPACITY * colours.astype(np.float32)
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), mode="RGB")


def explain_files(
    model: torch.nn.Module,
    meta: dict[str, Any],
    point: OperatingPoint,
    inputs: torch.Tensor,
    scores: Sequence[float],
    paths: Sequence[str | Path],
    targets: Sequence[Path],
    max_side: int | None = None,
) -> None:
    """Write the overlay of each ``paths[i]`` to ``targets[i]`` (PNG), at the photo's own size or,
    with ``max_side``, shrunk to fit it. ``inputs``: the normalised model inputs of these photos."""
    device = next(model.parameters()).device
    positive = meta["classes"].index(point.positive_class)
    called = torch.tensor([score >= point.threshold for score in scores])
    cams = grad_cam(model, inputs.to(device), positive, called).numpy()
    centre = 0.0 if cells_centred_on_strides(model) else 0.5
    for path, target, cam in zip(paths, targets, cams, strict=True):
        picture = overlay(load_rgb(path, tuple(meta["alpha_background"])), cam, centre)
        if max_side is not None:
            picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, format="PNG")


def confident_errors(truth: np.ndarray, score: np.ndarray, threshold: float, limit: int) -> tuple[list[int], list[int]]:
    """Indices of the most confident false negatives (positive images with the lowest P(positive))
    and false positives (negative images with the highest), up to ``limit`` each, most confident first."""
    truth, score = np.asarray(truth, dtype=bool), np.asarray(score, dtype=np.float64)
    called = score >= threshold
    misses = np.flatnonzero(truth & ~called)
    alarms = np.flatnonzero(~truth & called)
    misses = misses[np.argsort(score[misses], kind="stable")]
    alarms = alarms[np.argsort(-score[alarms], kind="stable")]
    return misses[:limit].tolist(), alarms[:limit].tolist()


def overlay_names(paths: Sequence[str | Path]) -> list[str]:
    """``<stem>.png`` per photo, ``<stem>-2.png`` … where stems repeat (photos from several folders)."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem, copy = Path(path).stem, 1
        name = f"{stem}.png"
        while name in used:
            copy += 1
            name = f"{stem}-{copy}.png"
        used.add(name)
        names.append(name)
    return names

"""The methodology's augmentation, batched on the training device.

The PIL pipeline (:mod:`anemia_dist.transforms`) runs per image: resize, flip, rotate,
colour jitter, affine, each a separate pass on the CPU. Here a whole batch of cached uint8
images is done in one resampling pass: per sample, the resize to the training size, the flip,
the rotation and the affine rotation/scale/translation are composed into one 2×3 matrix and
applied with ``grid_sample`` (the sampling grid is ``affine_grid``'s, computed in a form that
is also fast on a CPU); brightness/contrast jitter and ImageNet normalisation follow as
element-wise ops. The parameter ranges are read from the PIL pipeline itself, so both paths
draw from the same distributions. Nothing here copies from the host or waits for the device,
so the CPU can queue the next steps while the GPU works.

Differences from the PIL pipeline, all deliberate: bilinear sampling in one pass (the PIL
pipeline resamples twice with nearest-neighbour, torchvision's default for rotations), and the
colour jitter after the geometry rather than between the rotation and the affine. Brightness
commutes with resampling; contrast blends towards the mean grey of the final frame instead of
the intermediate one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from .transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform

GREY_WEIGHTS = (0.2989, 0.587, 0.114)
"""torchvision's ``rgb_to_grayscale`` weights, which its contrast adjustment averages."""


@dataclass(frozen=True)
class AugmentRanges:
    """The random ranges of the methodology's transforms."""

    flip_p: float
    rotation: float
    """``RandomRotation``: uniform in ±rotation degrees, counter-clockwise."""
    degrees: float
    """``RandomAffine``: uniform in ±degrees, clockwise."""
    translate: float
    """``RandomAffine``: up to this fraction of the side, rounded to whole pixels."""
    scale: tuple[float, float]
    brightness: tuple[float, float]
    contrast: tuple[float, float]

    @classmethod
    def from_pil_pipeline(cls, image_size: int = 224) -> AugmentRanges:
        """Read from :func:`anemia_dist.transforms.train_transform`: one definition for both paths."""
        found = {type(t): t for t in train_transform(image_size).transforms}
        flip, rotation = found[T.RandomHorizontalFlip], found[T.RandomRotation]
        jitter, affine = found[T.ColorJitter], found[T.RandomAffine]
        if affine.shear is not None or jitter.saturation is not None or jitter.hue is not None:
            raise ValueError("the PIL pipeline uses transforms this batched path does not implement")
        if affine.translate[0] != affine.translate[1]:
            raise ValueError("the batched path assumes the same translate range on both axes")
        return cls(
            flip_p=flip.p,
            rotation=float(rotation.degrees[1]),
            degrees=float(affine.degrees[1]),
            translate=float(affine.translate[0]),
            scale=tuple(affine.scale),
            brightness=tuple(jitter.brightness),
            contrast=tuple(jitter.contrast),
        )


@dataclass
class AugmentParams:
    """One sample's draw per row, in torchvision's conventions."""

    flip: torch.Tensor  # bool [B]
    rotation: torch.Tensor  # degrees, as F.rotate
    angle: torch.Tensor  # degrees, as F.affine
    translate: torch.Tensor  # [B, 2] pixels at the output size, as F.affine
    scale: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    brightness_first: torch.Tensor  # bool [B]: ColorJitter applies its adjustments in random order


def sample_params(
    batch: int,
    image_size: int,
    ranges: AugmentRanges,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> AugmentParams:
    """Draw every sample's parameters at once, from the global RNG of ``device`` by default."""
    u = torch.rand(batch, 9, device=device, generator=generator)

    def uniform(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u[:, column]

    shift = ranges.translate * image_size
    return AugmentParams(
        flip=u[:, 0] < ranges.flip_p,
        rotation=uniform(1, -ranges.rotation, ranges.rotation),
        angle=uniform(2, -ranges.degrees, ranges.degrees),
        translate=torch.stack([uniform(3, -shift, shift), uniform(4, -shift, shift)], dim=1).round(),
        scale=uniform(5, *ranges.scale),
        brightness=uniform(6, *ranges.brightness),
        contrast=uniform(7, *ranges.contrast),
        brightness_first=u[:, 8] < 0.5,
    )


def _rotate_scale(degrees: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """R(a) / s with R(a) = [[cos a, -sin a], [sin a, cos a]] (y points down), [B, 2, 2]."""
    turn = torch.deg2rad(degrees)
    cos, sin = torch.cos(turn) / scale, torch.sin(turn) / scale
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


def _with_offset(linear: torch.Tensor, translate: torch.Tensor, image_size: int) -> torch.Tensor:
    """[A | -A·t] for q -> A·(q - t), with t given in output pixels."""
    shift = translate.to(linear) * (2.0 / image_size)
    return torch.cat([linear, -(linear @ shift.unsqueeze(-1))], dim=2)


def affine_thetas(params: AugmentParams, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample 2×3 ``affine_grid`` matrices, output coordinates -> input coordinates.

    In normalised coordinates (a square picture spans [-1, 1] whatever its pixel size, so the
    resize is implicit) the PIL pipeline's steps take a point p of the resized picture to
    ``q = t + s·R(angle)·R(-rotation)·Flip·p``. Returns the inverse of that whole chain, which
    samples the picture, and the inverse of the affine step alone, which locates each output
    pixel in the rotated frame: the PIL pipeline crops that frame (its corners come out black), so
    output pixels that fall outside it must be black here too.
    """
    ones = torch.ones_like(params.scale)
    mirror = torch.diag_embed(torch.stack([torch.where(params.flip, -ones, ones), ones], dim=1))
    affine_inverse = _rotate_scale(-params.angle, params.scale)
    whole_inverse = mirror @ _rotate_scale(params.rotation, ones) @ affine_inverse
    return (
        _with_offset(whole_inverse, params.translate, image_size),
        _with_offset(affine_inverse, params.translate, image_size),
    )


def _coordinates(theta: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y planes [B, size, size] of ``F.affine_grid(theta, ..., align_corners=False)``,
    each one broadcast multiply-add (several times faster than affine_grid on a CPU)."""
    coords = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    row, column = coords.view(1, size, 1), coords.view(1, 1, size)
    t = theta.view(-1, 2, 3, 1, 1)
    return tuple(torch.addcmul(t[:, i, 1] * row + t[:, i, 2], t[:, i, 0], column) for i in (0, 1))


def _jitter_step(images: torch.Tensor, factor: torch.Tensor, is_contrast: torch.Tensor, scale: float = 1.0):
    """Brightness (blend with black) or contrast (blend with the picture's mean grey) per sample,
    as torchvision's ``adjust_brightness``/``adjust_contrast``, of ``images * scale``; in place."""
    grey = images.mean((2, 3)) @ _grey_weights(images.device) * scale
    offset = ((1.0 - factor) * grey * is_contrast.to(grey)).view(-1, 1, 1, 1)
    return torch.addcmul(offset, images, (factor * scale).view(-1, 1, 1, 1), out=images).clamp_(0.0, 1.0)


def color_jitter(images: torch.Tensor, params: AugmentParams, scale: float = 1.0) -> torch.Tensor:
    """Brightness and contrast, in each sample's own order, of ``images * scale`` (which must lie
    in [0, 1]); in place."""
    first = torch.where(params.brightness_first, params.brightness, params.contrast)
    second = torch.where(params.brightness_first, params.contrast, params.brightness)
    images = _jitter_step(images, first, ~params.brightness_first, scale)
    return _jitter_step(images, second, params.brightness_first)


def normalize(
    images: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The backbone's normalisation (ImageNet's by default), written straight into ``memory_format`` (one pass)."""
    inverse_std, shift = _normalisation(images.device, tuple(mean), tuple(std))
    out = torch.empty_like(images, memory_format=memory_format)
    return torch.addcmul(shift, images, inverse_std, out=out)


@cache
def _grey_weights(device: torch.device) -> torch.Tensor:
    """The grey weights on ``device``, copied there once: a host-to-device copy of a fresh tensor
    makes the host wait for the device."""
    return torch.tensor(GREY_WEIGHTS).to(device)


@cache
def _normalisation(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """1/std and -mean/std on ``device``, copied there once per backbone normalisation (the cache
    key is always positional, so every caller shares one entry)."""
    std_tensor = torch.tensor(std).view(1, 3, 1, 1)
    shift = -torch.tensor(mean).view(1, 3, 1, 1) / std_tensor
    return (1.0 / std_tensor).to(device), shift.to(device)


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch (the decoded-image cache), got {images.dtype}")


def augment(images: torch.Tensor, params: AugmentParams, image_size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] at any square size -> augmented float in [0, 1], [B, 3, S, S].

    Pixels that come from outside the picture are black, as the PIL pipeline's ``fill=0``.
    """
    _check_uint8(images)
    whole, affine_step = affine_thetas(params, image_size)
    x, y = _coordinates(whole, image_size)
    frame_x, frame_y = _coordinates(affine_step, image_size)
    x.masked_fill_(torch.maximum(frame_x.abs_(), frame_y.abs_()) > 1.0, 2.0)  # beyond the picture: black
    grid = torch.stack([x, y], dim=-1)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return color_jitter(images, params, scale=1.0 / 255)  # grid_sample is linear: rescale in the jitter's pass


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [0, 1] at S×S, antialiased like torchvision's Resize."""
    _check_uint8(images)
    images = images.float().div_(255.0)
    if images.shape[-2:] == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


class TrainAugment:
    """Random augmentation + normalisation of a cached uint8 batch, on the batch's device."""

    def __init__(
        self,
        image_size: int,
        channels_last: bool = True,
        ranges: AugmentRanges | None = None,
        normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        self.image_size = image_size
        self.ranges = ranges or AugmentRanges.from_pil_pipeline(image_size)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.normalization = normalization
        """(mean, std) of the backbone's pretraining."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        params = sample_params(images.shape[0], self.image_size, self.ranges, images.device)
        return normalize(augment(images, params, self.image_size), self.memory_format, *self.normalization)


class EvalResize:
    """Validation: resize + normalisation only, deterministic."""

    def __init__(
        self,
        image_size: int,
        channels_last: bool = True,
        normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        self.image_size = image_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.normalization = normalization

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize(images, self.image_size), self.memory_format, *self.normalization)

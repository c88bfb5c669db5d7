"""The quality gate: refuse to score a file that is not a usable photo.

A screening model turns anything into a probability: a 1×1 black PNG, a blank 16-bit scan or a
20000×10 strip would come out as a confident "non-anemic". ``predict`` and ``evaluate`` therefore
measure every file before scoring it and reject (with the reason, never a probability) one that is

- smaller than ``data.min_size`` on its shorter side,
- far more elongated than any training image (long side / short side above
  :data:`ASPECT_FACTOR` × the training split's largest),
- nearly uniform (grey-level standard deviation below :data:`UNIFORM_STD` of 255) or nearly all
  transparent (under :data:`OPAQUE_FRACTION` of its pixels opaque),
- far darker or brighter than any training image (mean grey level more than
  :data:`BRIGHTNESS_MARGIN` outside the training split's range).

The training ranges are measured on the training split when a run starts and saved under
``quality`` in ``best/meta.json`` (:func:`training_ranges`); a checkpoint without them gets the
checks that need no ranges. The measurements are of the picture the model sees: EXIF-rotated,
converted to sRGB and composited onto the alpha background, sampled (nearest pixel) down to :data:`MEASURE_SIDE` pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .images import IMAGE_EXTENSIONS, decode_rgb, has_alpha

QUALITY = "quality"
"""The meta.json key holding the training split's ranges."""
REJECTED = "rejected"
"""The decision written for a file the gate refuses."""
MEASURE_SIDE = 128
UNIFORM_STD = 1.0
"""CP-AnemiC's least varied image has 3.7; a blank or single-colour file has 0."""
OPAQUE_FRACTION = 0.01
ASPECT_FACTOR = 2.0
BRIGHTNESS_MARGIN = 32.0
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma."""


@dataclass(frozen=True)
class Measure:
    width: int
    height: int
    opaque: float
    """Fraction of pixels with alpha > 0 (1 without an alpha channel)."""
    brightness: float
    """Mean grey level, 0..255."""
    contrast: float
    """Standard deviation of the grey level, 0..255."""

    @property
    def elongation(self) -> float:
        return max(self.width, self.height) / max(1, min(self.width, self.height))


def measure(path: str | Path, background: Sequence[int]) -> Measure:
    """The gate's measurements of one file (raises ``OSError`` when it cannot be decoded)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (MEASURE_SIDE, MEASURE_SIDE))
        image.load()
        opaque = 1.0
        if has_alpha(image):
            opaque = float((np.asarray(image.convert("RGBA").getchannel("A")) > 0).mean())
        rgb = decode_rgb(image, tuple(background))
    rgb.thumbnail((MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.NEAREST)  # sampled, not averaged: noise stays
    grey = np.asarray(rgb, dtype=np.float64) @ GREY_WEIGHTS
    return Measure(width, height, opaque, float(grey.mean()), float(grey.std()))


def unusable(found: Measure, ranges: dict[str, Any] | None, min_size: int) -> str:
    """Why the file must not be scored, or "" when it may be."""
    width, height = found.width, found.height
    if min(width, height) < min_size:
        return f"{width}x{height} pixels, smaller than data.min_size={min_size}"
    if found.opaque < OPAQUE_FRACTION:
        return f"nearly all transparent ({found.opaque:.2%} of pixels opaque)"
    if found.contrast < UNIFORM_STD:
        return f"nearly uniform (grey-level standard deviation {found.contrast:.2f} of 255)"
    if not ranges:
        return ""
    widest = ranges["max_elongation"]
    if found.elongation > ASPECT_FACTOR * widest:
        return f"aspect ratio {found.elongation:.1f}:1, far outside the training images' (up to {widest:.1f}:1)"
    low, high = ranges["brightness"]
    if not low - BRIGHTNESS_MARGIN <= found.brightness <= high + BRIGHTNESS_MARGIN:
        side = "darker" if found.brightness < low else "brighter"
        return (
            f"far {side} than any training image (mean grey level {found.brightness:.0f}, "
            f"training images {low:.0f}-{high:.0f})"
        )
    return ""


@dataclass(frozen=True)
class Verdict:
    """One file's gate outcome: ``error`` when it cannot be read, else ``reason`` when rejected."""

    error: str = ""
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return not self.error and not self.reason


class _Measured(Dataset):
    def __init__(self, paths: Sequence[str | Path], background: Sequence[int]):
        self.paths, self.background = [str(p) for p in paths], tuple(background)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Measure | str:
        try:
            return measure(self.paths[index], self.background)
        except Exception as error:  # any decoding failure belongs to this file
            return f"{type(error).__name__}: {error}"


def _as_is(item: Any) -> Any:
    return item


def measure_all(paths: Sequence[str | Path], background: Sequence[int], num_workers: int = 0) -> list[Measure | str]:
    """:func:`measure` for every path (a string: the read error), in ``num_workers`` loader processes."""
    workers = min(num_workers, len(paths))
    loader = DataLoader(_Measured(paths, background), batch_size=None, num_workers=workers, collate_fn=_as_is)
    return list(loader)


def screen(paths: Sequence[str | Path], meta: dict[str, Any], min_size: int, num_workers: int = 0) -> list[Verdict]:
    """The gate for every path, against the checkpoint's training ranges (``meta["quality"]``)."""
    ranges = meta.get(QUALITY)
    if ranges:
        min_size = ranges.get("min_size", min_size)
    verdicts = []
    for found in measure_all(paths, meta["alpha_background"], num_workers):
        if isinstance(found, str):
            verdicts.append(Verdict(error=found))
        else:
            verdicts.append(Verdict(reason=unusable(found, ranges, min_size)))
    return verdicts


def training_ranges(
    paths: Sequence[str | Path], background: Sequence[int], min_size: int, num_workers: int = 0
) -> dict[str, Any]:
    """What meta.json keeps of the training split for the gate (files that cannot be read are left out)."""
    found = [m for m in measure_all(paths, background, num_workers) if isinstance(m, Measure)]
    if not found:
        return {"min_size": min_size}
    brightness = [m.brightness for m in found]
    return {
        "min_size": min_size,
        "images": len(found),
        "max_elongation": max(m.elongation for m in found),
        "brightness": [min(brightness), max(brightness)],
    }


def list_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Every file given or found under a given folder (recursively, sorted; hidden names skipped),
    each with the error that keeps it from being read: a missing path, a broken link, a format
    this package does not read. Nothing is dropped silently."""
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(
                p
                for p in item.rglob("*")
                if not any(part.startswith(".") for part in p.relative_to(item).parts)
                and (p.is_file() or p.is_symlink())
            )
            found += [(p, input_error(p)) for p in files]
        else:
            found.append((item, input_error(item)))
    return found


def input_error(path: Path) -> str:
    """Why ``path`` cannot be read as an image, or ""."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (to {os.readlink(path)})"
    if not path.exists():
        return "no such file or folder"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported format {path.suffix or '(no extension)'}; supported: {', '.join(IMAGE_EXTENSIONS)}"
    return ""

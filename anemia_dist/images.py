"""Decoding any image file into the RGB picture the model should see."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Apply EXIF orientation, then composite any alpha mask onto ``background``.

    A plain ``convert("RGB")`` drops the mask and keeps whatever colour sits under alpha=0,
    which on hand-cut conjunctiva crops is arbitrary and differs between images.
    """
    image = ImageOps.exif_transpose(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: scale to 0..255 rather than clip.
        return _wide_to_rgb(image)
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
    return Image.fromarray(scaled.round().astype("uint8"), mode="L").convert("RGB")


WORKING_SCALE = 1.2
"""Decoded training images are kept at this multiple of the training size: at the largest zoom of
the augmentation (scale 1.2) the training image still samples one stored pixel per output pixel."""


def working_size(image_size: int) -> int:
    return math.ceil(image_size * WORKING_SCALE)


def decode_rgb(image: Image.Image, background: tuple[int, int, int], min_side: int | None = None) -> Image.Image:
    """Decode an opened ``image`` with :func:`to_rgb`.

    ``min_side``: the caller will shrink the picture to about this size, so a JPEG may be decoded
    at a reduced DCT scale (1/2, 1/4 or 1/8) as long as both sides stay at least ``min_side``
    pixels. A 12-megapixel photo then decodes several times faster and at 1/64 of the memory.
    Other formats ignore it. Damaged data still fails: the whole entropy-coded stream is read at
    every scale.
    """
    if min_side is not None:
        image.draft(image.mode, (min_side, min_side))
    image.load()
    return to_rgb(image, background)


def load_rgb(path: str | Path, background: tuple[int, int, int], min_side: int | None = None) -> Image.Image:
    """Open ``path`` and :func:`decode_rgb` it."""
    with Image.open(path) as image:
        return decode_rgb(image, background, min_side)

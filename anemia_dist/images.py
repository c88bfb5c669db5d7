"""Decoding any image file into the RGB picture the model should see."""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps

pillow_heif.register_heif_opener()  # HEIC/HEIF (the iPhone default) opens like any other format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif")

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
COLOUR_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
"""Colours inside the sRGB gamut keep their exact values (perceptual rendering may shift them to
make room for out-of-gamut ones); colours outside it are clipped to its edge."""

_CMS_OUTPUT = {"RGB": "RGB", "RGBA": "RGBA", "L": "RGB", "CMYK": "RGB"}
"""Modes LittleCMS converts from, and the mode each becomes in sRGB."""


class ColourError(OSError):
    """An embedded colour profile that cannot be read or cannot convert the image to sRGB."""


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def embedded_profile(image: Image.Image) -> ImageCms.ImageCmsProfile | None:
    """The image's ICC profile, None when it has none (it is then taken as sRGB)."""
    data = image.info.get("icc_profile")
    if not data:
        return None
    try:
        return _parse_profile(bytes(data))
    except (OSError, ImageCms.PyCMSError) as error:
        raise ColourError(f"its embedded ICC profile cannot be read ({error}); re-save the image as sRGB") from None


def describe_profile(profile: ImageCms.ImageCmsProfile) -> str:
    return ImageCms.getProfileDescription(profile).strip() or "(no description)"


@lru_cache(maxsize=16)
def _parse_profile(data: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(data))


@lru_cache(maxsize=16)
def _to_srgb_transform(data: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """Built once per profile and mode: a dataset's photos share a handful of profiles. LittleCMS
    copies a transform's cache per call, so the audit's threads can share one."""
    return ImageCms.buildTransform(_parse_profile(data), SRGB, mode, _CMS_OUTPUT[mode], COLOUR_INTENT)


def to_srgb(image: Image.Image) -> Image.Image:
    """Convert the pixels from the embedded ICC profile's colour space to sRGB, alpha kept.

    A phone's Display P3 photo read as if it were sRGB shifts exactly the reds a pallor model
    measures. Images without a profile are returned unchanged.
    """
    profile = embedded_profile(image)
    if profile is None:
        return image
    if image.mode in ("P", "PA", "LA", "La", "RGBa", "RGBX"):
        image = image.convert("RGBA" if has_alpha(image) else "RGB")
    if image.mode not in _CMS_OUTPUT:
        raise ColourError(
            f"a {image.mode} image with an embedded ICC profile ({describe_profile(profile)}) cannot be converted "
            f"to sRGB; re-save it as 8-bit sRGB"
        )
    try:
        transform = _to_srgb_transform(bytes(image.info["icc_profile"]), image.mode)
    except ImageCms.PyCMSError as error:
        raise ColourError(
            f"its embedded ICC profile ({describe_profile(profile)}) cannot convert this {image.mode} image to sRGB "
            f"({error}); re-save it as sRGB"
        ) from None
    return ImageCms.applyTransform(image, transform)


def to_rgb(image: Image.Image, background: tuple[int, int, int], colour_manage: bool = True) -> Image.Image:
    """Apply EXIF orientation, convert to sRGB (:func:`to_srgb`), then composite any alpha mask
    onto ``background``.

    A plain ``convert("RGB")`` drops the mask and keeps whatever colour sits under alpha=0,
    which on hand-cut conjunctiva crops is arbitrary and differs between images.
    ``colour_manage=False`` reads the pixel values as they are stored (tests compare against it).
    """
    image = ImageOps.exif_transpose(image)
    if colour_manage:
        image = to_srgb(image)
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


def decode_rgb(
    image: Image.Image, background: tuple[int, int, int], min_side: int | None = None, colour_manage: bool = True
) -> Image.Image:
    """Decode an opened ``image`` with :func:`to_rgb`.

    ``min_side``: the caller will shrink the picture to about this size, so a JPEG may be decoded
    at a reduced DCT scale (1/2, 1/4 or 1/8) as long as both sides stay at least ``min_side``
    pixels. A 12-megapixel photo then decodes several times faster and at 1/64 of the memory.
    Other formats ignore it (HEIF's ``draft`` would swap in an embedded thumbnail, whose choice
    depends on the size asked for: training and prediction would read different pictures).
    Damaged data still fails: the whole entropy-coded stream is read at every scale.
    """
    if min_side is not None and image.format == "JPEG":
        image.draft(image.mode, (min_side, min_side))
    image.load()
    return to_rgb(image, background, colour_manage)


def load_rgb(
    path: str | Path, background: tuple[int, int, int], min_side: int | None = None, colour_manage: bool = True
) -> Image.Image:
    """Open ``path`` and :func:`decode_rgb` it."""
    with Image.open(path) as image:
        return decode_rgb(image, background, min_side, colour_manage)

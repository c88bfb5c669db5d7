"""Near copies: the same picture re-cut, trimmed, rescaled, re-encoded, mirrored or turned.

CP-AnemiC holds copies that a difference hash cannot see: mirrored and 180/90-degree-turned
copies (pixel for pixel), and copies re-cut or trimmed by a tenth. Each image therefore becomes
one small vector taken in the frame of its own mask: the mask's mass (alpha, or for an RGB
picture whatever differs from a flat border) gives a centre, the direction of its long axis and
its spread along and across it; the premultiplied colours and the mask are resampled in that
frame (rotation removed, scale removed, the thin axis partly stretched) into a 32 x 32
thumbnail, and the lowest 8 x 8 2-D DCT frequencies of each channel are kept. A trimmed tip or a
re-cut edge barely moves that frame, where it moves a bounding box; a small rotation does not
move it at all. The distance between two images is the smallest Euclidean distance over the 8
mirror/90-degree images of one of them (EXIF orientations included), which in DCT space are
sign flips and a transpose, so nothing is decoded twice.

Pairs are found with a k-d tree over the lowest frequencies (u + v <= 4) of each channel. That is
a projection, never longer than the whole distance, so every pair within the cut-off is among the
tree's candidates and the result equals the all-pairs search; the work grows with the number of
candidates, not with the number of all pairs.

The cut-off and the measurements behind it: docs/near-copies.md.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft
from scipy.spatial import cKDTree

from .errors import DataError
from .images import has_alpha, to_rgb

VERSION = "near-copies-1"
"""Changes whenever the vectors or the distance change: vectors of two versions do not compare."""
DEFAULT_THRESHOLD = 0.10
"""Distances at or below this are near copies; chosen on the benchmark (docs/near-copies.md)."""

THUMB = 32
"""Side of the square thumbnail the DCT is taken of."""
KEEP = 8
"""Lowest DCT frequencies kept per axis and channel."""
CHANNELS = 4
"""Premultiplied R, G, B, then the mask."""
DIMENSIONS = CHANNELS * KEEP * KEEP
WINDOW = 1.8
"""Half the thumbnail's side, in standard deviations of the mask along each axis: the faint tips
of a crescent fall outside, so trimming them changes little."""
STRETCH = 0.75
"""How far the thin axis is stretched towards the long one's scale (0 none, 1 fully): enough to
resolve a thin crescent, not so much that a re-cut edge dominates."""
MAX_ASPECT = 8.0
"""Bound on the long/thin spread ratio used for the stretch (a line would divide by zero)."""
BORDER_TOLERANCE = 0.08
"""An RGB picture has a flat background when most border pixels are within this (0..1) of their median."""
_KEY = np.array([c * KEEP * KEEP + u * KEEP + v for c in range(CHANNELS) for u in range(5) for v in range(5 - u)])
"""Columns the k-d tree indexes (frequencies u + v <= 4, 60 of 256): enough of the vector that few
pairs pass for checking; mirroring only flips their signs and a turn swaps u and v, so each
orientation's key is the same columns."""
_CHUNK = 1 << 16
"""Candidate pairs checked on the whole vector at a time (bounded memory)."""


VERDICTS = ("copy", "distinct", "unsure")
"""What a review CSV's verdict column may say about a pair."""


def read_review(path: str | Path) -> list[tuple[str, str, str]]:
    """(name, name, verdict) rows of a review CSV with columns a, b, verdict (copy/distinct/unsure), note."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    bad = [row for row in rows if row.get("verdict") not in VERDICTS or not row.get("a") or not row.get("b")]
    if bad:
        raise DataError(f"{path}: every row needs columns a, b and a verdict in {', '.join(VERDICTS)}; found {bad[0]}")
    return [(row["a"], row["b"], row["verdict"]) for row in rows]


def _with_mask(image: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """The picture as RGBA whose alpha is :func:`mask`, and that mask. (Whether EXIF orientation
    was applied does not matter: the distance ignores orientation.)"""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return rgba, np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255
    rgba = to_rgb(image, (0, 0, 0))
    shown = _foreground(np.asarray(rgba, dtype=np.float32) / 255)
    rgba.putalpha(Image.fromarray(np.round(shown * 255).astype(np.uint8), "L"))
    return rgba, shown


def mask(image: Image.Image) -> np.ndarray:
    """What the picture shows, 0..1 per pixel: its alpha, or for an RGB picture whatever differs
    from a flat border (a cut-out saved without alpha); all ones for a photo."""
    return _with_mask(image)[1]


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """A soft mask of what differs from a flat border (a cut-out saved without alpha), else all ones."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    if np.mean(np.abs(border - background).max(axis=1) <= BORDER_TOLERANCE) < 0.5:
        return np.ones(rgb.shape[:2], dtype=np.float32)
    difference = np.abs(rgb - background).max(axis=2)
    return np.clip((difference - BORDER_TOLERANCE / 2) / BORDER_TOLERANCE, 0, 1)


def _frame(shown: np.ndarray) -> tuple[float, float, float, float, float]:
    """(centre x, centre y, angle of the long axis, spread along it, spread across it) of the mask's
    mass, in continuous pixel coordinates (pixel i spans [i, i + 1))."""
    total = float(shown.sum())
    if total <= 0:
        shown, total = np.ones_like(shown), float(shown.size)
    rows, cols = np.arange(shown.shape[0]) + 0.5, np.arange(shown.shape[1]) + 0.5
    cy, cx = float(shown.sum(axis=1) @ rows / total), float(shown.sum(axis=0) @ cols / total)
    dy, dx = rows - cy, cols - cx
    syy = float(shown.sum(axis=1) @ dy**2 / total)
    sxx = float(shown.sum(axis=0) @ dx**2 / total)
    sxy = float(dy @ shown @ dx / total)
    half_trace, root = (sxx + syy) / 2, np.hypot((sxx - syy) / 2, sxy)
    along = np.sqrt(max(half_trace + root, 1e-12))
    across = np.sqrt(max(half_trace - root, 0.0))
    across = max(across, along / MAX_ASPECT)
    return cx, cy, 0.5 * float(np.arctan2(2 * sxy, sxx - syy)), along, across


def _resample(premultiplied: Image.Image, frame: tuple[float, float, float, float, float]) -> np.ndarray:
    """4 x THUMB x THUMB planes (R, G, B premultiplied, mask) of the window around the centre, long axis horizontal."""
    cx, cy, angle, along, across = frame
    across = along ** (1 - STRETCH) * across**STRETCH
    step_u, step_v = 2 * WINDOW * along / THUMB, 2 * WINDOW * across / THUMB  # source pixels per thumbnail pixel
    width, height = premultiplied.size
    # Shrink first to about one pixel per step, so bilinear sampling does not alias. A resize (not
    # reduce) keeps the grid symmetric: a mirrored picture shrinks to the mirrored result.
    finest = min(step_u, step_v)
    size = (max(1, round(width / finest)), max(1, round(height / finest))) if finest > 2 else (width, height)
    if size != (width, height):
        premultiplied = premultiplied.resize(size, Image.Resampling.BOX)
    sx, sy = width / size[0], height / size[1]
    cos, sin = np.cos(angle), np.sin(angle)
    # Thumbnail point (u, v) -> source: x = cx + cos step_u (u - T/2) - sin step_v (v - T/2), y likewise.
    a, b, d, e = cos * step_u / sx, -sin * step_v / sx, sin * step_u / sy, cos * step_v / sy
    half = THUMB / 2
    coefficients = (a, b, cx / sx - half * (a + b), d, e, cy / sy - half * (d + e))
    planes = np.asarray(premultiplied, dtype=np.float32).transpose(2, 0, 1) / 255
    out = []
    for plane in planes:
        image = Image.fromarray(np.ascontiguousarray(plane), "F")
        thumb = image.transform((THUMB, THUMB), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
        out.append(np.asarray(thumb))
    return np.stack(out)


def feature(image: Image.Image) -> np.ndarray:
    """One opened image's vector (``DIMENSIONS`` float32): RGBA keeps its mask, RGB gets one from
    a flat border. A JPEG decoded at a reduced scale (as the audit does) is fine: the vector is
    taken from a 32 x 32 thumbnail."""
    rgba, shown = _with_mask(image)
    thumbs = _resample(rgba.convert("RGBa"), _frame(shown))
    coefficients = fft.dctn(thumbs, type=2, norm="ortho", axes=(1, 2))[:, :KEEP, :KEEP]
    return (coefficients / THUMB).astype(np.float32).ravel()


def features(images: Iterable[Image.Image]) -> np.ndarray:
    """One row per image, as :func:`feature`."""
    rows = [feature(image) for image in images]
    return np.stack(rows) if rows else np.zeros((0, DIMENSIONS), dtype=np.float32)


_ODD = np.where(np.arange(KEEP) % 2 == 1, -1.0, 1.0).astype(np.float32)  # mirroring negates odd frequencies


def orientations(vectors: np.ndarray) -> list[np.ndarray]:
    """``vectors`` as the 8 mirrored/turned images would give them, identity first."""
    blocks = vectors.reshape(len(vectors), CHANNELS, KEEP, KEEP)
    flip_rows, flip_cols = _ODD[:, None], _ODD[None, :]
    return [
        np.ascontiguousarray(turned * signs).reshape(len(vectors), DIMENSIONS)
        for turned in (blocks, blocks.transpose(0, 1, 3, 2))
        for signs in (np.float32(1), flip_cols, flip_rows, flip_rows * flip_cols)
    ]


def _smallest_distances(a: np.ndarray, oriented_b: Iterable[np.ndarray]) -> np.ndarray:
    """``len(a)`` x ``len(b)`` Euclidean distances, the smallest over the orientations of ``b`` given."""
    a64 = a.astype(np.float64)
    norms = (a64**2).sum(1)[:, None]
    best = None
    for oriented in oriented_b:
        b64 = np.ascontiguousarray(oriented, dtype=np.float64).reshape(len(oriented), -1)
        squared = norms + (b64**2).sum(1)[None, :] - 2 * a64 @ b64.T
        best = squared if best is None else np.minimum(best, squared)
    return np.sqrt(np.maximum(best, 0))


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairs' distances, ``len(a)`` x ``len(b)``: the smallest over the 8 orientations of ``b``.
    Quadratic; :func:`near_copy_pairs` and :func:`cross_pairs` find the close ones without it."""
    return _smallest_distances(a, orientations(b))


def _pairs(a: np.ndarray, b: np.ndarray, threshold: float, same: bool) -> list[tuple[int, int, float]]:
    if not len(a) or not len(b):
        return []
    tree = cKDTree(a[:, _KEY].astype(np.float64))
    radius = threshold * (1 + 1e-6) + 1e-9  # rounding must not drop a pair at the cut-off
    a64 = a.astype(np.float64)
    best: dict[tuple[int, int], float] = {}
    for turned in orientations(b):
        found = tree.sparse_distance_matrix(cKDTree(turned[:, _KEY].astype(np.float64)), radius, output_type="ndarray")
        i, j = found["i"].astype(np.intp), found["j"].astype(np.intp)
        if same:
            i, j = i[i < j], j[i < j]  # (j, i) in the inverse orientation is the same pair
        t64 = turned.astype(np.float64)
        for start in range(0, len(i), _CHUNK):
            ci, cj = i[start : start + _CHUNK], j[start : start + _CHUNK]
            distance = np.sqrt(((a64[ci] - t64[cj]) ** 2).sum(axis=1))
            close = distance <= threshold
            for pair, value in zip(
                zip(ci[close].tolist(), cj[close].tolist(), strict=True), distance[close].tolist(), strict=True
            ):
                if value < best.get(pair, np.inf):
                    best[pair] = value
    return sorted((i, j, d) for (i, j), d in best.items())


def near_copy_pairs(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, distance)``, i < j, of rows of ``vectors`` within ``threshold``, sorted."""
    return _pairs(vectors, vectors, threshold, same=True)


def cross_pairs(
    vectors_a: np.ndarray, vectors_b: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Every ``(i, j, distance)`` with row i of ``vectors_a`` and row j of ``vectors_b`` within ``threshold``."""
    return _pairs(vectors_a, vectors_b, threshold, same=False)


TINY = 8
"""Side of the thumbnails the split check compares: the whole picture as the model sees it."""


def tiny_thumbnail(image: Image.Image, background: Sequence[int]) -> np.ndarray:
    """The picture composited onto ``background`` as training does, squeezed to TINY x TINY RGB in
    0..1: a measure that shares nothing with the finder's frame, mask or DCT."""
    rgb = to_rgb(image, tuple(background)).resize((TINY, TINY), Image.Resampling.BOX)
    return (np.asarray(rgb, dtype=np.float32) / 255).ravel()


def thumbnail_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS difference (0..1) of all pairs of tiny thumbnails, the smallest over the 8 orientations of ``b``."""
    grids = b.reshape(len(b), TINY, TINY, 3)
    oriented = (
        flipped
        for turned in (grids, grids.transpose(0, 2, 1, 3))
        for flipped in (turned, turned[:, :, ::-1], turned[:, ::-1], turned[:, ::-1, ::-1])
    )
    return _smallest_distances(a, oriented) / np.sqrt(a.shape[1])


@dataclass(frozen=True)
class SplitMargin:
    """The split check: on tiny thumbnails, the closest validation-training pair against the
    closest pair of different copy groups within one side (which the finder left apart and the
    split did not separate). ``(i, j, distance)``; indices into the lists given."""

    closest_cross: tuple[int, int, float]
    """(validation index, training index, distance)."""
    closest_apart: tuple[str, int, int, float]
    """(side, index, index, distance), side ``train`` or ``val``."""

    @property
    def holds(self) -> bool:
        """True when no validation crop is closer to a training crop than the closest pair the finder left apart."""
        return self.closest_cross[2] > self.closest_apart[3]


_BLOCK = 1024
"""Rows of thumbnails compared at a time (memory: _BLOCK x the other side's count doubles)."""


def _closest(a: np.ndarray, b: np.ndarray, a_groups: np.ndarray | None = None, b_groups: np.ndarray | None = None):
    """(i, j, distance) of the closest pair between thumbnails ``a`` and ``b``, skipping pairs of
    one group when groups are given, in blocks of rows."""
    best = (-1, -1, np.inf)
    for start in range(0, len(a), _BLOCK):
        distance = thumbnail_distances(a[start : start + _BLOCK], b)
        if a_groups is not None:
            distance[a_groups[start : start + _BLOCK, None] == b_groups[None, :]] = np.inf
        i, j = np.unravel_index(int(np.argmin(distance)), distance.shape)
        if distance[i, j] < best[2]:
            best = (start + int(i), int(j), float(distance[i, j]))
    return best


def split_margin(
    val: np.ndarray, train: np.ndarray, val_groups: Sequence[object], train_groups: Sequence[object]
) -> SplitMargin:
    """:class:`SplitMargin` of tiny thumbnails ``val``/``train`` (rows from :func:`tiny_thumbnail`)
    whose copy groups (the finder's: exact and near copies merged) are ``val_groups``/``train_groups``.
    Compares all pairs (quadratic), a block of rows at a time."""
    if not len(val) or not len(train) or max(len(val), len(train)) < 2:
        raise ValueError("split_margin needs a validation crop, a training crop and two crops on one side")
    _, labels = np.unique([str(g) for g in [*val_groups, *train_groups]], return_inverse=True)
    val_labels, train_labels = labels[: len(val)], labels[len(val) :]
    apart = [
        (side, *_closest(thumbs, thumbs, groups, groups))
        for side, thumbs, groups in (("train", train, train_labels), ("val", val, val_labels))
        if len(thumbs) >= 2
    ]
    return SplitMargin(_closest(val, train), min(apart, key=lambda found: found[3]))

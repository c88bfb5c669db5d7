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

That vector cannot see a crop cut again by hand from the same photo: a longer tip or a redrawn
edge moves the frame, and such re-cuts lie as far apart as distinct look-alikes of other children.
What a re-cut keeps is the inside: the same shading, blotches and highlights at the same places
along the crescent. So each vector also holds the crop *straightened*: colours sampled along the
long axis (columns) from one edge of the mask to the other (rows), whatever the outline. A second
stage compares pairs within CANDIDATE_RADIUS of each other at the first stage whose colour
profiles agree (PROFILE_GATE): it slides and stretches one strip along the other (a trimmed tip,
a rescale), tries the 4 reversals (mirrors and turns), and asks that the aligned colours agree and
that their fine detail correlates; a featureless crop has no detail to correlate, so featureless
look-alikes stay apart. Its result is a distance on the first stage's scale (:func:`_aligned`): a
pair's distance is the smaller of the two stages'.

Pairs are found with k-d trees: the first stage's over the lowest frequencies (u + v <= 4) of each
channel, a projection never longer than the whole distance, so every pair within the cut-off is
among its candidates; the second stage's over the colour profiles' deciles, with the gate as its
radius. The result equals the all-pairs search, and the work grows with the number of candidates,
not with the number of all pairs.

The cut-off and the measurements behind it: docs/near-copies.md.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft, ndimage
from scipy.spatial import cKDTree

from .errors import DataError
from .images import has_alpha, to_rgb

VERSION = "near-copies-2"
"""Changes whenever the vectors or the distance change: vectors of two versions do not compare."""
DEFAULT_THRESHOLD = 0.10
"""Distances at or below this are near copies; chosen on the benchmark (docs/near-copies.md)."""

THUMB = 32
"""Side of the square thumbnail the DCT is taken of."""
KEEP = 8
"""Lowest DCT frequencies kept per axis and channel."""
CHANNELS = 4
"""Premultiplied R, G, B, then the mask."""
DCT_DIMENSIONS = CHANNELS * KEEP * KEEP
"""The first stage's part of a vector: the DCT coefficients."""
STRIP_LENGTH = 64
"""Samples of the straightened crop along its long axis."""
STRIP_ROWS = 8
"""Samples across it, from one edge of the mask to the other."""
_RENDER = 2 * STRIP_LENGTH
"""Columns the crop is rendered at, along its long axis, before the strip is taken."""
DIMENSIONS = DCT_DIMENSIONS + 3 * STRIP_ROWS * STRIP_LENGTH
CANDIDATE_RADIUS = 0.30
"""First-stage distance within which the second stage looks (every copy reviewed on CP-AnemiC lies within)."""
PROFILE_GATE = 0.03
"""Crops whose colour profiles (the deciles of each channel along the strip, 0..1) differ by more
than this (RMS) are not the same picture: a trimmed tip or a redrawn edge barely moves them, and
they index the second stage's candidates."""
_DECILES = np.linspace(0.1, 0.9, 9)
"""What the profile gate compares: 9 deciles per channel."""
STRIP_RMS = 0.02
"""At the default cut-off: aligned strips whose colours differ by at most this (RMS, 0..1) ..."""
STRIP_CORRELATION = 0.5
"""... and whose fine detail correlates at least this much pass the second stage."""
STRETCHES = np.exp(np.linspace(np.log(0.7), np.log(1 / 0.7), 15))
"""Length ratios tried when aligning two strips (a rescaled or trimmed copy)."""
SLIDES = np.linspace(-0.3, 0.3, 25) * STRIP_LENGTH
"""Offsets tried along the strip (a trimmed tip)."""
OVERLAP = 0.6
"""Least share of the strip that must overlap the other for an alignment to count."""
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


def mask_frame(shown: np.ndarray) -> tuple[float, float, float, float, float]:
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


def _render(
    premultiplied: Image.Image,
    size: tuple[int, int],
    origin: tuple[float, float],
    u_axis: tuple[float, float],
    v_axis: tuple[float, float],
) -> np.ndarray:
    """4 planes (R, G, B premultiplied, mask) of ``size`` (width, height) whose point (X, Y) shows
    the source at ``origin + X u_axis + Y v_axis`` (continuous pixel coordinates: pixel i spans
    [i, i + 1)). The source is shrunk first to about one pixel per step, so bilinear sampling does
    not alias; a resize (not reduce) keeps the grid symmetric: a mirrored picture shrinks to the
    mirrored result."""
    finest = min(np.hypot(*u_axis), np.hypot(*v_axis))
    width, height = premultiplied.size
    shrunk = (max(1, round(width / finest)), max(1, round(height / finest))) if finest > 2 else (width, height)
    if shrunk != (width, height):
        premultiplied = premultiplied.resize(shrunk, Image.Resampling.BOX)
    sx, sy = width / shrunk[0], height / shrunk[1]
    coefficients = (u_axis[0] / sx, v_axis[0] / sx, origin[0] / sx, u_axis[1] / sy, v_axis[1] / sy, origin[1] / sy)
    planes = np.asarray(premultiplied, dtype=np.float32).transpose(2, 0, 1) / 255
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(plane), "F").transform(
                    size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR
                )
            )
            for plane in planes
        ]
    )


def _resample(premultiplied: Image.Image, frame: tuple[float, float, float, float, float]) -> np.ndarray:
    """4 x THUMB x THUMB planes (R, G, B premultiplied, mask) of the window around the centre, long axis horizontal."""
    cx, cy, angle, along, across = frame
    across = along ** (1 - STRETCH) * across**STRETCH
    step_u, step_v = 2 * WINDOW * along / THUMB, 2 * WINDOW * across / THUMB  # source pixels per thumbnail pixel
    cos, sin = np.cos(angle), np.sin(angle)
    u_axis, v_axis = (cos * step_u, sin * step_u), (-sin * step_v, cos * step_v)
    half = THUMB / 2
    origin = (cx - half * (u_axis[0] + v_axis[0]), cy - half * (u_axis[1] + v_axis[1]))
    return _render(premultiplied, (THUMB, THUMB), origin, u_axis, v_axis)


def _strip(rgba: Image.Image, shown: np.ndarray, angle: float) -> np.ndarray:
    """3 x STRIP_ROWS x STRIP_LENGTH: the crop straightened. Rendered with its long axis horizontal
    (no scale removed: a strip spans the mask's whole length), each column's colours are sampled
    at STRIP_ROWS even steps between the mask's edges, then the columns are resampled to
    STRIP_LENGTH. A re-cut edge moves where a column's samples fall a little, not what they show."""
    ys, xs = np.nonzero(shown > 0.5)
    if len(xs) < 2:
        return np.zeros((3, STRIP_ROWS, STRIP_LENGTH), dtype=np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    along, across = (xs + 0.5) * cos + (ys + 0.5) * sin, (ys + 0.5) * cos - (xs + 0.5) * sin
    u0, v0 = along.min() - 0.5, across.min() - 0.5
    step = (along.max() + 0.5 - u0) / _RENDER  # source pixels per rendered pixel
    height = int(np.ceil((across.max() + 0.5 - v0) / step)) + 1
    origin = (u0 * cos - v0 * sin, u0 * sin + v0 * cos)
    planes = _render(
        rgba.convert("RGBa"), (_RENDER, height), origin, (step * cos, step * sin), (-step * sin, step * cos)
    )
    inside = planes[3] > 0.5
    columns = np.nonzero(inside.sum(axis=0) >= 2)[0]
    if len(columns) < 2:
        return np.zeros((3, STRIP_ROWS, STRIP_LENGTH), dtype=np.float32)
    first, last = inside.argmax(axis=0), height - 1 - inside[::-1].argmax(axis=0)
    rows = first + (np.arange(STRIP_ROWS)[:, None] + 0.5) / STRIP_ROWS * (last - first)  # ROWS x _RENDER
    low = np.clip(np.floor(rows).astype(np.intp), 0, height - 2)
    weight = np.clip(rows - low, 0, 1)
    cols = np.arange(_RENDER)
    sampled = planes[:, low, cols] * (1 - weight) + planes[:, low + 1, cols] * weight  # 4 x ROWS x _RENDER
    colours = sampled[:3] / np.maximum(sampled[3], 1e-3)
    position = np.linspace(columns[0], columns[-1], STRIP_LENGTH)
    left = np.clip(np.floor(position).astype(np.intp), 0, _RENDER - 2)
    share = position - left
    return (colours[..., left] * (1 - share) + colours[..., left + 1] * share).astype(np.float32)


def feature(image: Image.Image) -> np.ndarray:
    """One opened image's vector (``DIMENSIONS`` float32): the first stage's DCT coefficients, then
    the straightened strip. RGBA keeps its mask, RGB gets one from a flat border. A JPEG decoded
    at a reduced scale (as the audit does) is fine: both parts are small."""
    rgba, shown = _with_mask(image)
    frame = mask_frame(shown)
    thumbs = _resample(rgba.convert("RGBa"), frame)
    coefficients = fft.dctn(thumbs, type=2, norm="ortho", axes=(1, 2))[:, :KEEP, :KEEP]
    return np.concatenate([(coefficients / THUMB).ravel(), _strip(rgba, shown, frame[2]).ravel()]).astype(np.float32)


def features(images: Iterable[Image.Image]) -> np.ndarray:
    """One row per image, as :func:`feature`."""
    rows = [feature(image) for image in images]
    return np.stack(rows) if rows else np.zeros((0, DIMENSIONS), dtype=np.float32)


_ODD = np.where(np.arange(KEEP) % 2 == 1, -1.0, 1.0).astype(np.float32)  # mirroring negates odd frequencies


def orientations(vectors: np.ndarray) -> list[np.ndarray]:
    """The first stage's part of ``vectors`` as the 8 mirrored/turned images would give it, identity first."""
    blocks = vectors[:, :DCT_DIMENSIONS].reshape(len(vectors), CHANNELS, KEEP, KEEP)
    flip_rows, flip_cols = _ODD[:, None], _ODD[None, :]
    return [
        np.ascontiguousarray(turned * signs).reshape(len(vectors), DCT_DIMENSIONS)
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


COARSE = 4
"""Strip samples averaged into one for the coarse alignment search (the fine one refines it)."""


def _alignments(pool: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left sample, share of the next, inside) per alignment x sample of a strip pooled by
    ``pool``: where sample s of one strip falls on the other, stretched by each of STRETCHES and
    slid by each of SLIDES (alignment k = stretch index x len(SLIDES) + slide index). Alignments
    that overlap less than OVERLAP of the strip have no sample inside."""
    length = STRIP_LENGTH // pool
    centre = pool * np.arange(length) + (pool - 1) / 2  # a pooled sample's place on the full strip
    position = STRETCHES[:, None, None] * (centre[None, None, :] - SLIDES[None, :, None])
    position = ((position - (pool - 1) / 2) / pool).reshape(-1, length)
    inside = (position >= 0) & (position <= length - 1)
    inside &= inside.mean(axis=1, keepdims=True) >= OVERLAP
    left = np.clip(np.floor(position).astype(np.intp), 0, length - 2)
    return left, np.clip(position - left, 0, 1).astype(np.float32), inside


_FINE = _alignments(1)
_SEARCHED = np.nonzero(np.add.outer(np.arange(len(STRETCHES)) % 2, np.arange(len(SLIDES)) % 2).ravel() == 0)[0]
"""Alignments the coarse search tries: every other stretch and slide (the fine one fills the gaps)."""
_COARSE = tuple(part[_SEARCHED] for part in _alignments(COARSE))
_NEIGHBOURS = np.array([(ds, dl) for ds in (-1, 0, 1) for dl in (-1, 0, 1)])
"""Steps of the stretch and slide grid around the coarse search's best that the fine one tries."""
_PAIR_BATCH = 256
"""Pairs the second stage aligns at a time (memory: _PAIR_BATCH x alignments x a coarse profile)."""


def _strips(vectors: np.ndarray) -> np.ndarray:
    return vectors[:, DCT_DIMENSIONS:].reshape(len(vectors), 3, STRIP_ROWS, STRIP_LENGTH)


def _detail(strips: np.ndarray) -> np.ndarray:
    """What a re-cut keeps and a look-alike does not: the strips less their smooth shading."""
    return strips - ndimage.gaussian_filter(strips, (0, 0, 1, 3), mode="nearest")


def _at(strips: np.ndarray, grid: tuple[np.ndarray, np.ndarray, np.ndarray], alignment: np.ndarray) -> np.ndarray:
    """``strips`` (pairs x ... x samples) sampled where each pair's alignment (pairs x tried) puts
    the other strip: pairs x ... x tried x samples."""
    left, share = grid[0][alignment], grid[1][alignment]  # pairs x tried x samples
    extra = strips.ndim - 2
    index = left.reshape(len(strips), *(1,) * extra, -1)
    low = np.take_along_axis(strips, index, axis=-1).reshape(*strips.shape[:-1], *left.shape[1:])
    high = np.take_along_axis(strips, index + 1, axis=-1).reshape(low.shape)
    weight = share.reshape(len(strips), *(1,) * extra, *share.shape[1:])
    return low * (1 - weight) + high * weight


def _profile_errors(
    profile_a: np.ndarray,
    profile_b: np.ndarray,
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    alignment: np.ndarray | None = None,
) -> np.ndarray:
    """Mean squared colour difference per pair and alignment tried (pairs x tried; every one of
    ``grid`` when ``alignment`` is None), inf where they do not overlap."""
    if alignment is None:
        left, share, inside = grid
        sampled = profile_b[:, :, left] * (1 - share) + profile_b[:, :, left + 1] * share  # pairs x 3 x K x samples
    else:
        sampled, inside = _at(profile_b, grid, alignment), grid[2][alignment]
    error = (((sampled - profile_a[:, :, None]) ** 2).sum(axis=1) * inside).sum(axis=-1)
    counted = inside.sum(axis=-1)
    return np.where(counted > 0, error / np.maximum(counted, 1), np.inf)


def _verified(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The second stage's distance of pairs (row i of ``a``, row j of ``b``): the smaller of
    aligning b to a and a to b, so that it does not depend on the order (:func:`_aligned`)."""
    strips_a, strips_b = _strips(a), _strips(b)
    detail_a, detail_b = _detail(strips_a), _detail(strips_b)
    return np.minimum(
        _aligned(strips_a[i], strips_b[j], detail_a[i], detail_b[j]),
        _aligned(strips_b[j], strips_a[i], detail_b[j], detail_a[i]),
    )


def _aligned(sa: np.ndarray, sb: np.ndarray, detail_a: np.ndarray, detail_b: np.ndarray) -> np.ndarray:
    """The second stage's distance of strips ``sb`` aligned to ``sa`` (pairs x 3 x ROWS x LENGTH),
    on the first stage's scale: ``DEFAULT_THRESHOLD`` x the larger of (aligned colour RMS /
    STRIP_RMS) and (1 - detail correlation) / (1 - STRIP_CORRELATION), so at the default cut-off a
    pair passes when both tests do and a lower cut-off asks more of both."""
    out = np.empty(len(sa))
    for start in range(0, len(sa), _PAIR_BATCH):
        batch = slice(start, start + _PAIR_BATCH)
        a, b, da, db = sa[batch], sb[batch], detail_a[batch], detail_b[batch]
        pairs = len(a)
        # 1. Slide and stretch b's colour profile along a's, either end first: coarse, then fine
        # around the coarse best (a trimmed tip, a rescale, a mirror).
        profile_a, profile_b = a.mean(axis=2), b.mean(axis=2)  # pairs x 3 x LENGTH
        pooled_a = profile_a.reshape(pairs, 3, -1, COARSE).mean(axis=3)
        pooled_b = profile_b.reshape(pairs, 3, -1, COARSE).mean(axis=3)
        coarse = [_profile_errors(pooled_a, pooled_b[..., ::-1] if r else pooled_b, _COARSE) for r in (0, 1)]
        reverse, best = np.divmod(np.concatenate(coarse, axis=1).argmin(axis=1), len(_SEARCHED))
        stretch, slide = np.divmod(_SEARCHED[best], len(SLIDES))
        near_stretch = np.clip(stretch[:, None] + _NEIGHBOURS[:, 0], 0, len(STRETCHES) - 1)
        near_slide = np.clip(slide[:, None] + _NEIGHBOURS[:, 1], 0, len(SLIDES) - 1)
        nearby = near_stretch * len(SLIDES) + near_slide  # pairs x 9
        along = np.where(reverse[:, None, None, None], b[..., ::-1], b)
        along_detail = np.where(reverse[:, None, None, None], db[..., ::-1], db)
        fine = _profile_errors(profile_a, along.mean(axis=2), _FINE, nearby)
        alignment = nearby[np.arange(pairs), fine.argmin(axis=1)][:, None]  # pairs x 1
        inside = _FINE[2][alignment][:, None, None, 0, :]  # pairs x 1 x 1 x LENGTH
        counted = 3 * STRIP_ROWS * np.maximum(inside.sum(axis=(1, 2, 3)), 1)
        # 2. At that alignment, the rows either way up: the one whose colours agree better.
        rms, correlation = np.full(pairs, np.inf), np.zeros(pairs)
        for flip in (False, True):
            colours = _at(along[:, :, ::-1] if flip else along, _FINE, alignment)[..., 0, :]
            error = np.sqrt((((colours - a) ** 2) * inside).sum(axis=(1, 2, 3)) / counted)
            detail = _at(along_detail[:, :, ::-1] if flip else along_detail, _FINE, alignment)[..., 0, :]
            better = error < rms
            rms[better] = error[better]
            correlation[better] = _correlation(da * inside, detail * inside, inside)[better]
        out[batch] = DEFAULT_THRESHOLD * np.maximum(rms / STRIP_RMS, (1 - correlation) / (1 - STRIP_CORRELATION))
    return out


def _correlation(x: np.ndarray, y: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Pearson correlation per pair over the samples ``inside`` (x and y already zero outside)."""
    count = 3 * STRIP_ROWS * inside.sum(axis=(1, 2, 3))
    x = (x - (x.sum(axis=(1, 2, 3)) / count)[:, None, None, None]) * inside
    y = (y - (y.sum(axis=(1, 2, 3)) / count)[:, None, None, None]) * inside
    scale = np.sqrt((x**2).sum(axis=(1, 2, 3)) * (y**2).sum(axis=(1, 2, 3)))
    return np.where(scale > 0, (x * y).sum(axis=(1, 2, 3)) / np.maximum(scale, 1e-12), 0.0)


def _deciles(vectors: np.ndarray) -> np.ndarray:
    """The deciles of each channel of each strip's colour profile (rows averaged), n x 27."""
    profile = _strips(vectors).mean(axis=2)
    return np.quantile(profile, _DECILES, axis=2).transpose(1, 2, 0).reshape(len(vectors), -1)


def _combined(
    a: np.ndarray,
    b: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    first: np.ndarray,
    deciles: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """The finder's distance of pairs (row i of ``a``, row j of ``b``) whose first-stage distance
    is ``first``: the smaller of the two stages, the second only for pairs within CANDIDATE_RADIUS
    whose colour profiles (``deciles`` of a and b, :func:`_deciles`) pass PROFILE_GATE."""
    out = first.astype(np.float64).copy()
    gap = np.sqrt(((deciles[0][i] - deciles[1][j]) ** 2).mean(axis=1))
    pick = np.nonzero((first <= CANDIDATE_RADIUS) & (gap <= PROFILE_GATE))[0]
    if len(pick):
        out[pick] = np.minimum(out[pick], _verified(a, b, i[pick], j[pick]))
    return out


def first_stage_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairs' first-stage distances (the smallest over the 8 orientations of ``b``): what
    ``near-copies-1`` measured, kept for the benchmark's comparison."""
    return _smallest_distances(a[:, :DCT_DIMENSIONS], orientations(b))


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairs' distances, ``len(a)`` x ``len(b)``: the first stage's, or the second's where
    smaller. Quadratic; :func:`near_copy_pairs` and :func:`cross_pairs` find the close ones without it."""
    first = first_stage_distances(a, b)
    i, j = np.nonzero(first <= CANDIDATE_RADIUS)
    first[i, j] = _combined(a, b, i, j, first[i, j], (_deciles(a), _deciles(b)))
    return first


def _first_stage_pairs(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """First-stage distances of the pairs (row i of ``a``, row j of ``b``)."""
    a64, best = a[:, :DCT_DIMENSIONS].astype(np.float64), np.full(len(i), np.inf)
    for turned in orientations(b):
        t64 = turned.astype(np.float64)
        for start in range(0, len(i), _CHUNK):
            ci, cj = i[start : start + _CHUNK], j[start : start + _CHUNK]
            best[start : start + _CHUNK] = np.minimum(
                best[start : start + _CHUNK], np.sqrt(((a64[ci] - t64[cj]) ** 2).sum(axis=1))
            )
    return best


def _within(a: np.ndarray, b: np.ndarray, radius: float, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of rows of ``a`` and ``b`` within ``radius`` (Euclidean; i < j when ``same``), by k-d trees."""
    radius = radius * (1 + 1e-6) + 1e-9  # rounding must not drop a pair at the edge
    found = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="ndarray")
    i, j = found["i"].astype(np.intp), found["j"].astype(np.intp)
    return (i[i < j], j[i < j]) if same else (i, j)


def _pairs(a: np.ndarray, b: np.ndarray, threshold: float, same: bool) -> list[tuple[int, int, float]]:
    """Pairs within ``threshold``: the first stage's from a k-d tree over its lowest frequencies
    (each orientation of ``b``), the second's from a k-d tree over the colour profiles' deciles."""
    if not len(a) or not len(b):
        return []
    key = a[:, _KEY].astype(np.float64)
    first_i, first_j = zip(
        *(_within(key, turned[:, _KEY].astype(np.float64), threshold, same) for turned in orientations(b)), strict=True
    )  # (j, i) in the inverse orientation is the same pair, hence i < j for one set
    deciles_a, deciles_b = _deciles(a), _deciles(b)
    second_i, second_j = _within(deciles_a, deciles_b, PROFILE_GATE * np.sqrt(deciles_a.shape[1]), same)
    i, j = np.concatenate([*first_i, second_i]), np.concatenate([*first_j, second_j])
    pair = np.unique(np.stack([i, j], axis=1), axis=0).reshape(-1, 2)
    i, j = pair[:, 0], pair[:, 1]
    distance = _combined(a, b, i, j, _first_stage_pairs(a, b, i, j), (deciles_a, deciles_b))
    close = distance <= threshold
    return list(zip(i[close].tolist(), j[close].tolist(), distance[close].tolist(), strict=True))


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

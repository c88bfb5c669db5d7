"""The labelled near-copy benchmark, the finders scored on it, and the leak in CP-AnemiC's split.

Copies are made from source crops by one transformation (or a chain of three) of each kind in
:data:`KINDS`; distinct pairs are crops of different pictures. Sources are CP-AnemiC's distinct
crops (with ``--data``) and generated crescent crops. Each finder is scored per kind: recall on
copies (the copy within the cut-off of its source) and false merges (the copy, or an original,
within the cut-off of a different picture). Everything is seeded; docs/near-copies.md holds the
table this writes and the command that reproduces it::

    python -m anemia_dist.near_copy_bench --data ../shared/data/cp-anemic \
        --review anemia_dist/configs/cp_anemic_review.csv --out docs/near-copies.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import near_copies
from .audit import connected_groups, dhash
from .config import DEFAULT_INPUT_SIZE, DataConfig
from .images import IMAGE_EXTENSIONS, decode_rgb, working_size

BLACK = (0, 0, 0)
"""What a plain ``convert("RGB")`` shows under CP-AnemiC's transparent pixels."""
GREY = tuple(DataConfig().alpha_background)
"""data.alpha_background's default: what the pipeline composites onto, and what the audit hashes."""


def _as_rgba(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(canvas, _as_rgba(image)).convert("RGB")


def _encoded(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def _sign(rng: np.random.Generator) -> int:
    return int(rng.choice([-1, 1]))


def trim(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Each side cut by 1-5 % of the crop."""
    w, h = image.size
    left, top, right, bottom = np.maximum(1, np.round(rng.uniform(0.01, 0.05, 4) * [w, h, w, h])).astype(int)
    return image.crop((left, top, w - right, h - bottom))


def shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The crop window moved by 1-5 % each way: one side cut, the other padded with transparency."""
    w, h = image.size
    dx, dy = np.maximum(1, np.round(rng.uniform(0.01, 0.05, 2) * [w, h])).astype(int) * [_sign(rng), _sign(rng)]
    return _as_rgba(image).crop((int(dx), int(dy), w + int(dx), h + int(dy)))


def rescale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Resized by 5-20 %, up or down."""
    factor = 1 + _sign(rng) * rng.uniform(0.05, 0.20)
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def jpeg(quality: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    """Saved as JPEG: the mask composited onto black (a plain export) or the pipeline's grey."""

    def apply(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        background = BLACK if rng.random() < 0.5 else GREY
        return _encoded(_composite(image, background), "JPEG", quality=quality)

    apply.__doc__ = f"JPEG at quality {quality}, on black or grey"
    return apply


def png_rgb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The mask dropped: a lossless RGB PNG on black or the pipeline's grey."""
    return _encoded(_composite(image, BLACK if rng.random() < 0.5 else GREY), "PNG")


def hflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def vflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def rot90(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_90 if rng.random() < 0.5 else Image.Transpose.ROTATE_270)


def rot180(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_180)


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Turned by 1-5 degrees either way, the canvas grown to hold it."""
    angle = _sign(rng) * rng.uniform(1, 5)
    return _as_rgba(image).rotate(angle, Image.Resampling.BICUBIC, expand=True)


def _gains(image: Image.Image, gains: np.ndarray) -> Image.Image:
    rgba = np.asarray(_as_rgba(image)).astype(np.float32)
    rgba[..., :3] = np.clip(rgba[..., :3] * gains, 0, 255)
    return Image.fromarray(rgba.round().astype(np.uint8), "RGBA")


def brightness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """All channels scaled by 5-15 %, brighter or darker."""
    return _gains(image, np.full(3, 1 + _sign(rng) * rng.uniform(0.05, 0.15)))


def white_balance(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Each channel scaled on its own by up to 10 % (at least one by 4 % or more)."""
    gains = 1 + rng.uniform(-0.10, 0.10, 3)
    strongest = int(np.argmax(np.abs(gains - 1)))
    gains[strongest] = 1 + np.sign(gains[strongest] - 1 or 1) * max(abs(gains[strongest] - 1), 0.04)
    return _gains(image, gains)


def recut(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The mask's edge moved in or out by up to 3 pixels along a smooth random line; pixels the
    wider cut takes in get the colour of the nearest pixel inside (the old cut hid what was there)."""
    rgba = np.asarray(_as_rgba(image)).astype(np.float32)
    inside = rgba[..., 3] >= 128
    depth_in = ndimage.distance_transform_edt(inside)
    depth_out, (rows, cols) = ndimage.distance_transform_edt(~inside, return_indices=True)
    signed = np.where(inside, depth_in, 0.5 - depth_out)
    noise = ndimage.gaussian_filter(rng.normal(size=inside.shape), sigma=max(2.0, min(inside.shape) / 8))
    edge = noise / (np.abs(noise).max() + 1e-12) * rng.uniform(1.5, 3.0)
    out = rgba.copy()
    out[..., :3] = rgba[rows, cols, :3]
    out[..., 3] = np.clip(signed - edge, 0, 1) * 255
    return Image.fromarray(out.round().astype(np.uint8), "RGBA")


SINGLE: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "trim": trim,
    "shift": shift,
    "rescale": rescale,
    "jpeg_q95": jpeg(95),
    "jpeg_q75": jpeg(75),
    "jpeg_q50": jpeg(50),
    "png_rgb": png_rgb,
    "hflip": hflip,
    "vflip": vflip,
    "rot90": rot90,
    "rot180": rot180,
    "rotate": rotate,
    "brightness": brightness,
    "white_balance": white_balance,
    "recut": recut,
}
EDITS = ("trim", "shift", "rescale", "hflip", "rotate", "brightness", "white_balance", "recut")
"""What ``combined`` chains three of, in random order, before saving half of its copies as JPEG."""


def combined(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for name in rng.choice(EDITS, 3, replace=False):
        image = SINGLE[str(name)](image, rng)
    return SINGLE["jpeg_q75"](image, rng) if rng.random() < 0.5 else image


def retrace(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cut again by hand from the same photo, as CP-AnemiC's re-cuts are: one tip shortened by
    8-15 % of the crop's length (along its long axis), the edge redrawn (:func:`recut`), and the
    crop rescaled by 5-20 %."""
    rgba = np.asarray(_as_rgba(image)).copy()
    cx, cy, angle, _, _ = near_copies.mask_frame(rgba[..., 3].astype(np.float32) / 255)
    rows, cols = np.mgrid[0 : rgba.shape[0], 0 : rgba.shape[1]] + 0.5
    along = (cols - cx) * np.cos(angle) + (rows - cy) * np.sin(angle)
    along = along * _sign(rng)
    shown = along[rgba[..., 3] > 0]
    cut = shown.max() - rng.uniform(0.08, 0.15) * (shown.max() - shown.min())
    rgba[along > cut, 3] = 0
    kept_rows, kept_cols = np.nonzero(rgba[..., 3])
    box = (kept_cols.min(), kept_rows.min(), kept_cols.max() + 1, kept_rows.max() + 1)
    return rescale(recut(Image.fromarray(rgba, "RGBA").crop(box), rng), rng)


KINDS = {**SINGLE, "combined": combined, "retrace": retrace}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise in -1..1, drawn at a coarser grid for large ``sigma`` (fast)."""
    coarse = max(1, int(sigma // 3))
    small = ndimage.gaussian_filter(rng.normal(size=(-(-shape[0] // coarse), -(-shape[1] // coarse))), sigma / coarse)
    noise = np.asarray(Image.fromarray(small.astype(np.float32), "F").resize(shape[::-1], Image.Resampling.BILINEAR))
    return noise / (np.abs(noise).max() + 1e-12)


def synthetic_crop(seed: int) -> Image.Image:
    """A generated conjunctiva-like crop: an RGBA crescent (a curved band whose thickness swells and
    tapers unevenly, tilted), pink to red, darker or paler towards one end, with blotches, darker
    vessels and specular highlights; black under alpha=0, like CP-AnemiC's."""
    rng = np.random.default_rng(seed)
    length = rng.uniform(100, 360)
    thickness = length * rng.uniform(0.08, 0.3)
    bend = length * rng.uniform(0.1, 0.45)  # how far the middle sags below the tips
    skew, swell, lean = rng.uniform(-0.4, 0.4), rng.uniform(0.5, 1.6), rng.uniform(-0.5, 0.5)
    tilt = np.deg2rad(rng.uniform(-35, 35))
    side = int(np.hypot(length, bend + thickness)) + 8
    ys, xs = (np.mgrid[0:side, 0:side] + 0.5 - side / 2).astype(np.float32)
    along = (xs * np.cos(tilt) + ys * np.sin(tilt)) / length + 0.5  # 0..1 from tip to tip
    across = -xs * np.sin(tilt) + ys * np.cos(tilt)
    t = np.clip(along, 0, 1)
    centre = bend * (4 * (t - 0.5) ** 2 - 1 / 3) * -1 + skew * bend * (t - 0.5) ** 3 * 8
    half = thickness / 2 * np.sin(np.pi * t) ** swell * (1 + lean * (t - 0.5))
    band = (along > 0) & (along < 1) & (np.abs(across - centre) <= half)
    parts, count = ndimage.label(band)
    largest = parts == 1 + np.argmax(ndimage.sum_labels(np.ones_like(parts), parts, range(1, count + 1)))
    alpha = ndimage.gaussian_filter(largest.astype(np.float32), 0.7)  # a soft edge, like a hand cut's
    rows, cols = np.nonzero(alpha > 0.02)
    box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    alpha, t = alpha[box], t[box]
    height, width = alpha.shape

    rgb = np.array([rng.uniform(170, 240), rng.uniform(60, 150), rng.uniform(60, 140)], dtype=np.float32)
    rgb = rgb + ((t - 0.5) * rng.uniform(-80, 80))[..., None] * np.array([0.4, 1.0, 0.9], dtype=np.float32)
    rim = np.clip((across[box] - centre[box]) / np.maximum(half[box], 1), -1, 1)  # -1 upper edge .. 1 lower edge
    rgb = rgb + (rim * rng.uniform(-50, 50))[..., None].astype(np.float32)  # shadow or light along one edge
    for sigma, amplitude in ((rng.uniform(10, 25), rng.uniform(20, 60)), (rng.uniform(2, 6), rng.uniform(5, 20))):
        tint = np.array([1.0, rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)], dtype=np.float32)
        rgb = rgb + (_smooth_noise(rng, (height, width), sigma) * np.float32(amplitude))[..., None] * tint
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(3, 9))):  # vessels: thin dark curves
        phase, freq, level = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 4), rng.uniform(0.1, 0.9)
        line = height * (level + 0.2 * np.sin(freq * xx[0] / width * 2 * np.pi + phase)).astype(np.float32)
        depth = np.exp(-(((yy - line) / np.float32(rng.uniform(0.7, 2.0))) ** 2)) * np.float32(rng.uniform(20, 70))
        rgb -= depth[..., None] * np.array([0.3, 1, 1], dtype=np.float32)
    for _ in range(int(rng.integers(0, 5))):  # specular highlights
        hx, hy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1.5, 6)
        spot = np.exp(-((xx[0] - hx) ** 2)[None, :] / (2 * r * r)) * np.exp(
            -((yy[:, 0] - hy) ** 2)[:, None] / (2 * r * r)
        )
        rgb += (spot * rng.uniform(40, 110)).astype(np.float32)[..., None]
    visible = alpha > 0.02
    rgba = np.concatenate([np.clip(rgb, 0, 255) * visible[..., None], (alpha * visible)[..., None] * 255], axis=-1)
    return Image.fromarray(rgba.round().astype(np.uint8), "RGBA")


@dataclass
class Source:
    """Distinct pictures to copy from, with what is known about copies among them."""

    name: str
    images: list[Image.Image]
    names: list[str]
    groups: np.ndarray
    """Reference copy group per picture: pictures of one group are copies, never distinct pairs."""
    unsure: set[tuple[int, int]]
    """Pairs (i < j) reviewed as possibly the same picture: neither copies nor distinct."""
    copies_by_kind: dict[str, int]
    """How the reference groups were linked: pairs per kind of evidence."""


def generated_source(count: int, seed: int) -> Source:
    images = [synthetic_crop(seed * 1_000_003 + i) for i in range(count)]
    return Source("generated", images, [f"generated_{i}" for i in range(count)], np.arange(count), set(), {})


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _identical_up_to_turns(images: Sequence[Image.Image]) -> list[tuple[int, int, str]]:
    """(i, j, turn) of pictures that are pixel for pixel one picture mirrored or turned (the same
    mask, colours within 2 levels); turn names the transpose, or is empty for no turn."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_size[tuple(sorted(image.size))].append(i)
    found = []
    for members in by_size.values():
        for k, a in enumerate(members):
            reference = np.asarray(images[a].convert("RGBA")).astype(np.int16)
            shown = reference[..., 3] > 0
            for b in members[k + 1 :]:
                for turn in [None, *Image.Transpose]:
                    other = images[b] if turn is None else images[b].transpose(turn)
                    other = np.asarray(other.convert("RGBA")).astype(np.int16)
                    if other.shape != reference.shape or not np.array_equal(other[..., 3], reference[..., 3]):
                        continue
                    if np.abs(other[..., :3] - reference[..., :3])[shown].mean() <= 2:
                        found.append((a, b, "" if turn is None else turn.name))
                        break
    return found


def _components(n: int, pairs: Sequence[tuple[int, int]], groups: Sequence[int] | None = None) -> np.ndarray:
    """Component per item: items linked by a pair, or sharing one of ``groups``, are one."""
    keys: list[list[object]] = [[("group", int(g))] for g in groups] if groups is not None else [[] for _ in range(n)]
    for number, (a, b, *_) in enumerate(pairs):
        keys[a].append(number)
        keys[b].append(number)
    return connected_groups(n, keys)


def cp_anemic_source(folder: Path, review: Sequence[tuple[str, str, str]]) -> Source:
    """CP-AnemiC's distinct files (by content). Reference copies: what the audit finds today (the
    same bytes, dHash within 16 bits), pictures identical up to a mirror or turn, and pairs
    reviewed by eye as copies."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    first: dict[str, int] = {}
    index_of: dict[str, int] = {}
    paths = []
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in first:
            first[digest] = len(paths)
            paths.append(path)
        index_of[path.stem] = first[digest]
    images = [_load(p) for p in paths]
    links = {
        "dhash<=16": _hamming_pairs(_dhash_bits(images), 16),
        "identical up to a mirror/turn": [(a, b) for a, b, _ in _identical_up_to_turns(images)],
        "reviewed as copies": [(index_of[a], index_of[b]) for a, b, verdict in review if verdict == "copy"],
    }
    edges = [pair for pairs in links.values() for pair in pairs]
    unsure = {tuple(sorted((index_of[a], index_of[b]))) for a, b, verdict in review if verdict == "unsure"}
    names = [p.stem for p in paths]
    counts = {kind: len(pairs) for kind, pairs in links.items()}
    return Source("CP-AnemiC", images, names, _components(len(images), edges), unsure, counts)


def _dhash_bits(images: Sequence[Image.Image]) -> np.ndarray:
    """The audit's 256-bit dHash of each picture as decoded for training (composited onto the grey)."""
    side = working_size(DEFAULT_INPUT_SIZE)
    return np.array([np.unpackbits(np.frombuffer(dhash(decode_rgb(im, GREY, side)), np.uint8)) for im in images])


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.rint(a @ (1 - b).T + (1 - a) @ b.T)


def _hamming_pairs(bits: np.ndarray, cutoff: int) -> list[tuple[int, int]]:
    distance = _hamming(bits, bits)
    i, j = np.nonzero(np.triu(distance <= cutoff, k=1))
    return list(zip(i.tolist(), j.tolist(), strict=True))


def _box_hashes(images: Sequence[Image.Image]) -> np.ndarray:
    """dHash and pHash (256 bits each, imagehash) of the mask's bounding box composited onto the
    grey, for each of the 8 mirrors/turns: (images, 8, 512) bits."""
    import imagehash  # the comparison row only; not a dependency of the finder

    out = []
    for image in images:
        shown = near_copies.mask(image)
        rows, cols = np.nonzero(shown > 0.5)
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) if len(rows) else (0, 0, *image.size)
        crop = decode_rgb(image, GREY).crop(box)
        turned = [crop] + [crop.transpose(t) for t in Image.Transpose]
        out.append(
            [np.concatenate([imagehash.dhash(t, 16).hash.ravel(), imagehash.phash(t, 16).hash.ravel()]) for t in turned]
        )
    return np.array(out, dtype=np.uint8)


def _box_hash_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.min([_hamming(a[:, 0], b[:, turn]) for turn in range(b.shape[1])], axis=0)


@dataclass(frozen=True)
class Finder:
    name: str
    vectors: Callable[[Sequence[Image.Image]], np.ndarray]
    distances: Callable[[np.ndarray, np.ndarray], np.ndarray]
    cutoff: float | None
    """None: the largest cut-off within the false-merge budget on every set."""
    integer: bool = False


OLD = Finder("dHash-256 <= 16 (audit today)", _dhash_bits, _hamming, 16, integer=True)
OLD_RAISED = Finder("dHash-256, cut-off from the benchmark", _dhash_bits, _hamming, None, integer=True)
BOX_HASHES = Finder(
    "dHash+pHash of the mask's box, mirror/turn-invariant", _box_hashes, _box_hash_distances, None, True
)
FIRST_STAGE = Finder(
    "near-copies-1 (the first stage alone)",
    near_copies.features,
    near_copies.first_stage_distances,
    near_copies.DEFAULT_THRESHOLD,
)
NEW = Finder(
    f"{near_copies.VERSION} (this finder)", near_copies.features, near_copies.distances, near_copies.DEFAULT_THRESHOLD
)
FINDERS = (OLD, OLD_RAISED, BOX_HASHES, FIRST_STAGE, NEW)


@dataclass
class Case:
    kind: str
    source: int
    image: Image.Image


def make_copies(source: Source, per_kind: int, seed: int) -> list[Case]:
    """``per_kind`` copies of each kind, from sources drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    cases = []
    for kind, transform in KINDS.items():
        for i in rng.choice(len(source.images), size=min(per_kind, len(source.images)), replace=False):
            cases.append(Case(kind, int(i), transform(source.images[i], rng)))
    return cases


@dataclass
class Measured:
    """One finder's distances on one set: enough to count at any cut-off."""

    copy: np.ndarray
    """Per case: distance to its source."""
    copy_distinct: list[np.ndarray]
    """Per case: distances to the originals of other groups."""
    originals_distinct: np.ndarray
    """Pairs of originals of different groups (not reviewed as unsure)."""
    originals_copies: np.ndarray
    """Pairs of originals of one reference group (different files, same picture)."""
    kinds: list[str]
    seconds: float


def measure(finder: Finder, source: Source, cases: Sequence[Case]) -> Measured:
    started = time.perf_counter()
    originals = finder.vectors(source.images)
    copies = finder.vectors([case.image for case in cases])
    to_originals = finder.distances(copies, originals)
    among = finder.distances(originals, originals)
    seconds = time.perf_counter() - started
    groups = source.groups
    upper = np.triu(np.ones(among.shape, dtype=bool), k=1)
    same = groups[:, None] == groups[None, :]
    unsure = np.zeros_like(upper)
    for i, j in source.unsure:
        unsure[i, j] = True
    sources = np.array([case.source for case in cases])
    return Measured(
        copy=to_originals[np.arange(len(cases)), sources],
        copy_distinct=[row[groups != groups[s]] for row, s in zip(to_originals, sources, strict=True)],
        originals_distinct=among[upper & ~same & ~unsure],
        originals_copies=among[upper & same],
        kinds=[case.kind for case in cases],
        seconds=seconds,
    )


def distinct_distances(measured: Measured) -> np.ndarray:
    return np.concatenate([measured.originals_distinct, *measured.copy_distinct])


def choose_cutoff(m: Measured, budget: float, integer: bool) -> float:
    """The largest cut-off (whole bits, or a multiple of 0.01) at which at most ``budget`` of the
    set's distinct originals merge."""
    step = 1.0 if integer else 0.01
    distinct = np.sort(m.originals_distinct)
    allowed = int(budget * len(distinct))
    limit = distinct[allowed] if allowed < len(distinct) else np.inf  # the first pair one too many
    cutoff = np.floor(limit / step) * step
    while cutoff > 0 and np.sum(distinct <= cutoff) > allowed:
        cutoff -= step
    return round(float(cutoff), 3)


def curve(m: Measured, source: Source, vectors: np.ndarray, finder: Finder, cutoffs: Sequence[float]) -> list[dict]:
    """Per cut-off: false merges among distinct originals, recall on the made copies and on the
    set's own copies, and the largest group the merges would make (reference groups included)."""
    distance = finder.distances(vectors, vectors)
    rows = []
    for cutoff in cutoffs:
        i, j = np.nonzero(np.triu(distance <= cutoff, k=1))
        merged = _components(len(vectors), list(zip(i.tolist(), j.tolist(), strict=True)), source.groups)
        sizes = Counter(merged.tolist())
        rows.append(
            {
                "cutoff": cutoff,
                "false_merges": int(np.sum(m.originals_distinct <= cutoff)),
                "false_merge_rate": float(np.mean(m.originals_distinct <= cutoff)),
                "recall_made_copies": float(np.mean(m.copy <= cutoff)),
                "recall_own_copies": float(np.mean(m.originals_copies <= cutoff)) if len(m.originals_copies) else None,
                "largest_group": max(sizes.values()),
            }
        )
    return rows


def rates(m: Measured, cutoff: float) -> dict[str, dict[str, float]]:
    """Per kind (plus the set's own copies and its originals): recall on copies and false-merge rate."""
    out = {}
    kinds = np.array(m.kinds)
    for kind in dict.fromkeys(m.kinds):
        pick = np.nonzero(kinds == kind)[0]
        distinct = np.concatenate([m.copy_distinct[i] for i in pick])
        out[kind] = {
            "copies": len(pick),
            "recall": float(np.mean(m.copy[pick] <= cutoff)),
            "distinct_pairs": len(distinct),
            "false_merge_rate": float(np.mean(distinct <= cutoff)),
        }
    if len(m.originals_copies):
        out["own copies"] = {"copies": len(m.originals_copies), "recall": float(np.mean(m.originals_copies <= cutoff))}
    out["originals"] = {
        "distinct_pairs": len(m.originals_distinct),
        "false_merge_rate": float(np.mean(m.originals_distinct <= cutoff)),
        "false_merges": int(np.sum(m.originals_distinct <= cutoff)),
    }
    all_distinct = distinct_distances(m)
    out["all"] = {
        "copies": len(m.copy),
        "recall": float(np.mean(m.copy <= cutoff)),
        "distinct_pairs": len(all_distinct),
        "false_merge_rate": float(np.mean(all_distinct <= cutoff)),
    }
    return out


def score(sources: Sequence[Source], per_kind: int, seed: int, budget: float) -> dict[str, object]:
    """Every finder on every set. Cut-offs left open are chosen on the first set (CP-AnemiC when
    given: real look-alikes are what a cut-off must not merge) within ``budget``."""
    cases = {source.name: make_copies(source, per_kind, seed) for source in sources}
    result: dict[str, object] = {}
    for finder in FINDERS:
        measured = {s.name: measure(finder, s, cases[s.name]) for s in sources}
        chosen = choose_cutoff(measured[sources[0].name], budget, finder.integer)
        cutoff = chosen if finder.cutoff is None else finder.cutoff
        result[finder.name] = {
            "cutoff": cutoff,
            "cutoff_within_budget": chosen,
            "seconds": {name: round(m.seconds, 2) for name, m in measured.items()},
            "sets": {name: rates(m, cutoff) for name, m in measured.items()},
        }
        if finder is NEW:
            grid = [round(c, 3) for c in np.arange(0.06, 0.2001, 0.01)]
            result[finder.name]["curve"] = {
                s.name: curve(measured[s.name], s, finder.vectors(s.images), finder, grid) for s in sources
            }
            result[finder.name]["closest_distinct_originals"] = {s.name: closest_distinct(s, finder) for s in sources}
    return result


def closest_distinct(source: Source, finder: Finder, count: int = 12) -> list[dict[str, object]]:
    vectors = finder.vectors(source.images)
    distance = finder.distances(vectors, vectors)
    distance[source.groups[:, None] == source.groups[None, :]] = np.inf
    distance[np.tril_indices(len(distance))] = np.inf
    order = np.argsort(distance, axis=None)[:count]
    return [
        {
            "a": source.names[i],
            "b": source.names[j],
            "distance": round(float(distance[i, j]), 4),
            "reviewed_unsure": (i, j) in source.unsure,
        }
        for i, j in zip(*np.unravel_index(order, distance.shape), strict=True)
    ]


def split_findings(folder: Path, review: Sequence[tuple[str, str, str]], threshold: float) -> dict[str, object]:
    """CP-AnemiC's default split (``--config cp_anemic``) as built today, against the new finder:
    the pairs across it that dHash puts in the 20s-30s, the near copies that straddle it, the copy
    groups the new finder makes, and the split check on tiny thumbnails, today and with the new
    groups (5 stratified group folds, as data.folds=5 would make)."""
    from .config import load_config
    from .splits import build_split

    cfg = load_config("cp_anemic", [f"data.manifest={Path(folder) / 'Anemia_Data_Collection_Sheet.csv'}"])
    split = build_split(cfg.data, cfg.train.seed)
    samples = split.train + split.val
    is_val = np.array([False] * len(split.train) + [True] * len(split.val))
    labels = np.array([split.classes[s.label] for s in samples])
    names = [Path(s.path).stem for s in samples]
    images = [_load(Path(s.path)) for s in samples]
    digests = [hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in samples]
    digest_of = dict(zip(names, digests, strict=True))
    verdicts = {frozenset((digest_of[a], digest_of[b])): verdict for a, b, verdict in review}

    started = time.perf_counter()
    vectors = near_copies.features(images)
    pairs = near_copies.near_copy_pairs(vectors, threshold)
    finder_seconds = time.perf_counter() - started
    bits = _dhash_bits(images)

    val, train = np.nonzero(is_val)[0], np.nonzero(~is_val)[0]
    old = _hamming(bits[val], bits[train])
    new = near_copies.distances(vectors[val], vectors[train])

    def row(i: int, j: int) -> dict[str, object]:
        return {
            "val": names[i],
            "val_label": labels[i],
            "train": names[j],
            "train_label": labels[j],
            "dhash": int(_hamming(bits[i : i + 1], bits[j : j + 1])[0, 0]),
            "distance": round(float(near_copies.distances(vectors[i : i + 1], vectors[j : j + 1])[0, 0]), 4),
            "review": verdicts.get(frozenset((digests[i], digests[j])), ""),
        }

    issue_range = [row(val[a], train[b]) for a, b in zip(*np.nonzero((old >= 17) & (old <= 40)), strict=True)]
    straddling = [row(val[a], train[b]) for a, b in zip(*np.nonzero(new <= threshold), strict=True)]

    exact = _exact_pairs(digests)
    index = {s.path: i for i, s in enumerate(samples)}
    today_pairs = [
        (index[split.audit.checks[group[0]].path], index[split.audit.checks[member].path])
        for group in split.audit.exact_groups + split.audit.near_groups
        for member in group[1:]
    ]
    today_groups = _components(len(samples), today_pairs)
    new_groups = _components(len(samples), exact + [(a, b) for a, b, _ in pairs])
    members = defaultdict(list)
    for i, g in enumerate(new_groups):
        members[int(g)].append(i)
    multi = [m for m in members.values() if len(m) > 1]
    conflicting = [sorted(f"{names[i]} ({labels[i]})" for i in m) for m in multi if len(set(labels[m])) > 1]

    thumbs = np.array([near_copies.tiny_thumbnail(im, cfg.data.alpha_background) for im in images])
    y = np.array([s.label for s in samples])
    margins = _split_margins(thumbs, is_val, y, today_groups, new_groups, names, cfg.train.seed)
    return {
        "files": len(samples),
        "train": int((~is_val).sum()),
        "val": int(is_val.sum()),
        "finder_seconds_features_and_pairs": round(finder_seconds, 2),
        "val_train_pairs_dhash_17_to_40": sorted(issue_range, key=lambda r: r["dhash"]),
        "near_copies_across_the_split": sorted(straddling, key=lambda r: r["distance"]),
        "val_crops_with_a_copy_in_train": len({r["val"] for r in straddling}),
        "straddling_pairs_by_review": dict(Counter(r["review"] or "not reviewed" for r in straddling)),
        "dhash_17_to_40_pairs_by_review": dict(Counter(r["review"] or "not reviewed" for r in issue_range)),
        "straddling_pairs_with_opposite_labels": sum(r["val_label"] != r["train_label"] for r in straddling),
        "copy_groups": {
            "today (exact + dHash<=16)": _group_counts(today_groups, samples),
            "new (exact + this finder)": _group_counts(new_groups, samples),
        },
        "new_groups_with_conflicting_labels": conflicting,
        "split_margin": margins,
    }


def _exact_pairs(digests: Sequence[str]) -> list[tuple[int, int]]:
    """(first, other) for every byte-identical copy, by content digest."""
    by_digest = defaultdict(list)
    for i, digest in enumerate(digests):
        by_digest[digest].append(i)
    return [(m[0], other) for m in by_digest.values() for other in m[1:]]


def _split_margins(
    thumbs: np.ndarray,
    is_val: np.ndarray,
    labels: np.ndarray,
    today_groups: np.ndarray,
    new_groups: np.ndarray,
    names: Sequence[str],
    seed: int,
) -> dict[str, object]:
    """The split check on today's split and on 5 stratified group folds over the new groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    margins = {"today's split, today's groups": _margin(thumbs, is_val, today_groups, names)}
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(folds.split(np.zeros(len(labels)), labels, new_groups)):
        fold_val = np.zeros(len(labels), dtype=bool)
        fold_val[held] = True
        margins[f"fold {fold} of 5 over the new groups"] = _margin(thumbs, fold_val, new_groups, names)
    return margins


def _group_counts(groups: np.ndarray, samples: Sequence[object]) -> dict[str, int]:
    sizes = Counter(groups.tolist())
    return {
        "groups_of_copies": sum(size > 1 for size in sizes.values()),
        "files_in_them": sum(size for size in sizes.values() if size > 1),
        "distinct_pictures": len(sizes),
    }


def _margin(thumbs: np.ndarray, is_val: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> dict[str, object]:
    val, train = np.nonzero(is_val)[0], np.nonzero(~is_val)[0]
    found = near_copies.split_margin(thumbs[val], thumbs[train], groups[val], groups[train])
    i, j, cross = found.closest_cross
    side, a, b, apart = found.closest_apart
    pick = val if side == "val" else train
    return {
        "closest_cross": [names[val[i]], names[train[j]], round(cross, 4)],
        "closest_apart_within_a_side": [names[pick[a]], names[pick[b]], round(apart, 4)],
        "holds": found.holds,
    }


def scale(count: int, seed: int, check: int) -> dict[str, object]:
    """Features and pairs on ``count`` generated crops (a quarter sources, each with 3 copies of
    random kinds); the index's pairs against all-pairs distances on the first ``check``."""
    rng = np.random.default_rng(seed)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        sources = list(pool.map(synthetic_crop, range(seed * 1_000_003, seed * 1_000_003 + count // 4), chunksize=64))
    kinds = list(KINDS)
    images = sources + [KINDS[kinds[rng.integers(len(kinds))]](src, rng) for src in sources for _ in range(3)]
    images = images[:count]
    timings = {}
    for threads in (1, 2):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            vectors = np.stack(list(pool.map(near_copies.feature, images)))
        timings[f"features_{threads}_threads"] = round(time.perf_counter() - started, 2)
    pairs = {}
    for threshold in (near_copies.DEFAULT_THRESHOLD, near_copies.DEFAULT_THRESHOLD / 2):
        for n in (count // 4, count // 2, count):
            started = time.perf_counter()
            pairs[f"{n} images, cut-off {threshold:g}"] = len(near_copies.near_copy_pairs(vectors[:n], threshold))
            timings[f"pairs_{n}_cutoff_{threshold:g}"] = round(time.perf_counter() - started, 2)
    subset = vectors[:check]
    started = time.perf_counter()
    brute = near_copies.distances(subset, subset)
    timings[f"all_pairs_distances_{check}"] = round(time.perf_counter() - started, 2)
    i, j = np.nonzero(np.triu(brute <= near_copies.DEFAULT_THRESHOLD, k=1))
    indexed = {(a, b) for a, b, _ in near_copies.near_copy_pairs(subset)}
    return {
        "images": len(images),
        "pairs_found": pairs,
        "seconds": timings,
        f"index_equals_all_pairs_on_{check}": indexed == set(zip(i.tolist(), j.tolist(), strict=True)),
        f"pairs_on_{check}": len(indexed),
    }


def markdown(result: dict[str, object]) -> str:
    """The recall / false-merge table (one row per set and kind) and the new finder's cut-off curve."""
    finders = [f.name for f in FINDERS]
    header = ["set", "kind", "copies", *[f"recall: {n}" for n in finders], "distinct pairs"]
    header += [f"false merges: {n}" for n in finders]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for set_name, kinds in result[NEW.name]["sets"].items():
        for kind in kinds:
            row = [result[n]["sets"][set_name][kind] for n in finders]
            cells = [set_name, kind, str(row[-1].get("copies", ""))]
            cells += [f"{r['recall']:.2f}" if "recall" in r else "" for r in row]
            cells.append(str(row[-1].get("distinct_pairs", "")))
            cells += [f"{r['false_merge_rate']:.1e}" if "false_merge_rate" in r else "" for r in row]
            lines.append("| " + " | ".join(cells) + " |")
    cutoffs = ", ".join(f"{n}: {result[n]['cutoff']:g}" for n in finders)
    lines += ["", f"Cut-offs: {cutoffs}.", ""]
    for set_name, rows in result[NEW.name]["curve"].items():
        lines += [
            f"{NEW.name} on {set_name}:",
            "",
            "| cut-off | false merges (rate) | recall, made copies | recall, own copies | largest group |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            own = "" if r["recall_own_copies"] is None else f"{r['recall_own_copies']:.2f}"
            lines.append(
                f"| {r['cutoff']:.2f} | {r['false_merges']} ({r['false_merge_rate']:.1e}) | "
                f"{r['recall_made_copies']:.3f} | {own} | {r['largest_group']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anemia_dist.near_copy_bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, help="CP-AnemiC folder (class folders and the sheet); default: generated only"
    )
    parser.add_argument(
        "--review", type=Path, help="CSV of pairs reviewed by eye: a, b, verdict (copy/distinct/unsure), note"
    )
    parser.add_argument("--out", type=Path, default=Path("near-copies.json"))
    parser.add_argument("--generated", type=int, default=300, help="generated source crops")
    parser.add_argument("--per-kind", type=int, default=60, help="copies per kind and set")
    parser.add_argument("--budget", type=float, default=1e-4, help="false-merge rate allowed when choosing a cut-off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale", type=int, default=0, help="also time features and pairs on this many generated crops"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    review = near_copies.read_review(args.review) if args.review else []
    sources = [generated_source(args.generated, args.seed)]
    if args.data is not None:
        sources.insert(0, cp_anemic_source(args.data, review))
    result: dict[str, object] = {
        "finder_version": near_copies.VERSION,
        "threshold": near_copies.DEFAULT_THRESHOLD,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "sets": {
            s.name: {
                "originals": len(s.images),
                "reference_links": s.copies_by_kind,
                "reference_groups": len(set(s.groups.tolist())),
                "unsure_pairs": len(s.unsure),
            }
            for s in sources
        },
        "finders": score(sources, args.per_kind, args.seed, args.budget),
    }
    if args.data is not None:
        result["cp_anemic_split"] = split_findings(args.data, review, near_copies.DEFAULT_THRESHOLD)
    if args.scale:
        result["scale"] = scale(args.scale, args.seed, check=3000)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(markdown(result["finders"]))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

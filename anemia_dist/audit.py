"""Checks every image before training: bad files, exact and near duplicates, conflicting labels.

Each file is read once, hashed (SHA-256 of the bytes), and decoded as the decoded-image cache
decodes it (:func:`anemia_dist.images.decode_rgb`, JPEGs at the reduced DCT scale the training
size allows), so a file that passes cannot crash an epoch, and a 12-megapixel photo costs the
audit about a fifth of a full decode. Near duplicates (re-encoded, resized or re-cut copies) are
found with a 256-bit difference hash (the grey image shrunk to 17x16 pixels, one bit per
horizontally adjacent pair: left brighter than right) and with the mirror/turn invariant finder
of :mod:`anemia_dist.near_copies` (``data.near_copy_threshold``); pairs reviewed by eye as copies
(``data.copy_review``) join them. Each file's colour profile (converted to
sRGB by the decode) and camera (EXIF make and model) are counted, so a dataset mixing phones and
colour spaces shows it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import near_copies
from .config import DEFAULT_INPUT_SIZE, DataConfig, review_path
from .images import ColourError, decode_rgb, describe_profile, embedded_profile, working_size
from .run_dir import AUDIT_CSV, AUDIT_JSON, EXCLUDED
from .sources import Sample, class_name, load_samples

NO_MEASUREMENT = "no_measurement"
"""The bad-file kind of a manifest row whose data.measure_column is empty: it has no target or label."""
UNCONVERTIBLE_COLOUR = "unconvertible_colour"
"""The bad-file kind of an image whose embedded colour profile cannot convert it to sRGB."""
DECODED_KINDS = (None, "too_small", UNCONVERTIBLE_COLOUR)
"""Findings of files read as far as their colour profile and camera: both are known."""
EXIF_MAKE, EXIF_MODEL = 0x010F, 0x0110

HASH_SIZE = 16
"""dHash grid: 16 rows of 16 comparisons = 256 bits."""

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


@dataclass(frozen=True)
class FileCheck:
    """What one file turned out to be. ``problem``: None, or the kind of bad file: missing,
    unreadable, empty, not_image, truncated, corrupt, too_small, unconvertible_colour or
    no_measurement (a manifest row with an empty data.measure_column)."""

    path: str
    problem: str | None = None
    detail: str = ""
    sha256: str = ""
    dhash: bytes = b""
    width: int = 0
    height: int = 0
    profile: str = ""
    """The embedded colour profile's description; "" when there is none (read as sRGB) or unread."""
    camera: str = ""
    """EXIF make and model; "" when absent or unread."""
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The near-copy finder's vector (:func:`anemia_dist.near_copies.feature`); None for a bad file."""


def dhash(image: Image.Image) -> bytes:
    grey = np.asarray(image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS), dtype=np.int16)
    return np.packbits(grey[:, :-1] > grey[:, 1:]).tobytes()


def camera_name(image: Image.Image) -> str:
    """EXIF make and model, e.g. ``Apple iPhone 12`` (the make once, when the model repeats it)."""
    exif = image.getexif()
    make, model = (str(exif.get(tag, "")).strip("\x00 ") for tag in (EXIF_MAKE, EXIF_MODEL))
    if make and model.lower().startswith(make.lower()):
        return model
    return f"{make} {model}".strip()


def check_file(path: str, min_size: int, background: Sequence[int], decode_side: int, vector: bool = True) -> FileCheck:
    """Read, hash and decode one file; every failure becomes a finding, never an exception.

    ``decode_side``: as :func:`anemia_dist.images.decode_rgb`'s ``min_side``; the sizes reported
    are the file's own. ``vector``: also take the near-copy finder's vector."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return FileCheck(path, "missing", "no such file")
    except OSError as error:
        return FileCheck(path, "unreadable", f"{type(error).__name__}: {error.strerror or error}")
    if not data:
        return FileCheck(path, "empty", "0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    fmt, width, height, camera, profile = "image", 0, 0, "", ""  # until the header names them
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), camera = image.format or fmt, image.size, camera_name(image)
            found = embedded_profile(image)
            profile = describe_profile(found) if found is not None else ""
            rgb = decode_rgb(image, tuple(background), decode_side)
            found_vector = near_copies.feature(image) if vector else None
    except UnidentifiedImageError:
        return FileCheck(path, "not_image", f"not an image format Pillow can read ({len(data)} bytes)", digest)
    except ColourError as error:
        detail = f"{fmt}: {error}"
        return FileCheck(path, UNCONVERTIBLE_COLOUR, detail, digest, b"", width, height, profile, camera)
    except Exception as error:  # Pillow signals damaged data with OSError, SyntaxError, ValueError, ...
        kind = "truncated" if "truncat" in str(error).lower() else "corrupt"
        return FileCheck(path, kind, f"{fmt} does not decode: {error}", digest)
    if min(width, height) < min_size:
        detail = f"{width}x{height} pixels; data.min_size={min_size}"
        return FileCheck(path, "too_small", detail, digest, b"", width, height, profile, camera)
    return FileCheck(path, None, fmt, digest, dhash(rgb), width, height, profile, camera, found_vector)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    return _POPCOUNT[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: Sequence[bytes], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``max_distance`` bits.

    Every pair is compared, a block of rows at a time, one 64-bit word at a time (bounded memory);
    1-2 s for 10,000 distinct images on one core.
    """
    if len(hashes) < 2:
        return []
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), -1)
    columns = np.ascontiguousarray(words.T)
    block = max(1, 2**22 // len(hashes))
    pairs = []
    for start in range(0, len(words), block):
        rows = words[start : start + block]
        distance = np.zeros((len(rows), len(words) - start), dtype=np.uint16)
        for k in range(words.shape[1]):
            distance += _popcount(rows[:, k, None] ^ columns[k, None, start:])
        i, j = np.nonzero(distance <= max_distance)
        later = j > i  # both indices count from `start`
        pairs += [(start + a, start + b) for a, b in zip(i[later].tolist(), j[later].tolist(), strict=True)]
    return pairs


def connected_groups(n: int, keys: Sequence[Sequence[object]]) -> np.ndarray:
    """Component id per item, where items sharing any key are connected (components of the
    bipartite item-key graph: a union-find over patients, hashes, sites)."""
    key_index: dict[object, int] = {}
    rows, cols = [], []
    for item, item_keys in enumerate(keys):
        for key in item_keys:
            rows.append(item)
            cols.append(n + key_index.setdefault(key, len(key_index)))
    size = n + len(key_index)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    first_seen = {}
    return np.array([first_seen.setdefault(label, len(first_seen)) for label in labels[:n]])


@dataclass
class AuditReport:
    """Findings over a list of samples; indices refer to that list."""

    checks: list[FileCheck]
    labels: list[str]
    """Class name per sample."""
    exact_groups: list[list[int]]
    """Samples with byte-identical files, 2 or more per group."""
    near_groups: list[list[int]]
    """Samples whose distinct files are near duplicates of each other (with all their exact copies)."""
    min_size: int
    near_duplicate_distance: int | None
    seconds: float = 0.0
    near_copy_threshold: float | None = None
    """The finder's cut-off (``data.near_copy_threshold``); None when it was off."""
    reviewed_copies: int = 0
    """Pairs of files reviewed as copies (``data.copy_review``) found among the files."""
    measures: list[str] = field(default_factory=list)
    """The manifest's measurement per sample (``data.measure_column``); empty without one."""
    conflicts: list[tuple[str, int]] = field(init=False)
    """(``exact``/``near``, group index) of groups whose copies carry different labels."""

    def __post_init__(self) -> None:
        self.conflicts = [
            (scope, index)
            for scope, groups in (("exact", self.exact_groups), ("near", self.near_groups))
            for index, group in enumerate(groups)
            if len({self.labels[i] for i in group}) > 1
        ]

    def group(self, scope: str, index: int) -> list[int]:
        return (self.exact_groups if scope == "exact" else self.near_groups)[index]

    @property
    def bad(self) -> list[int]:
        return [i for i, check in enumerate(self.checks) if check.problem is not None]

    def class_counts(self, indices: Sequence[int] | None = None) -> dict[str, int]:
        chosen = range(len(self.labels)) if indices is None else indices
        counts = Counter(self.labels[i] for i in chosen if self.labels[i])  # "": no measurement, no class
        return dict(sorted(counts.items()))

    def colour_and_cameras(self) -> dict[str, object]:
        """Colour profiles (by description) and cameras (EXIF make and model), counted over the
        files read that far."""
        opened = [c for c in self.checks if c.problem in DECODED_KINDS]
        return {
            "colour_profiles": dict(Counter(c.profile for c in opened if c.profile).most_common()),
            "without_colour_profile": sum(not c.profile and c.problem != UNCONVERTIBLE_COLOUR for c in opened),
            "unconvertible_colour": sum(c.problem == UNCONVERTIBLE_COLOUR for c in opened),
            "cameras": dict(Counter(c.camera for c in opened if c.camera).most_common()),
            "without_camera": sum(not c.camera for c in opened),
        }

    def rows(self) -> list[dict[str, str]]:
        """Every finding, one row per file: kind, path, label, group, detail."""
        rows = [self._row(check.problem, i, "", check.detail) for i, check in enumerate(self.checks) if check.problem]
        for prefix, kind, groups in (
            ("E", "exact_duplicate", self.exact_groups),
            ("N", "near_duplicate", self.near_groups),
        ):
            for index, group in enumerate(groups):
                detail = f"{len(group)} files, " + (
                    f"sha256 {self.checks[group[0]].sha256[:16]}" if prefix == "E" else self.near_rule()
                )
                rows += [self._row(kind, i, f"{prefix}{index + 1}", detail) for i in group]
        for scope, index in self.conflicts:
            group = self.group(scope, index)
            name = f"{'E' if scope == 'exact' else 'N'}{index + 1}"
            labels = ", ".join(f"{label} x{count}" for label, count in Counter(self.labels[i] for i in group).items())
            rows += [self._row("conflicting_labels", i, name, f"{scope} duplicates labelled {labels}") for i in group]
        for scope, index in self.measure_conflicts():
            group = self.group(scope, index)
            name = f"{'E' if scope == 'exact' else 'N'}{index + 1}"
            values = ", ".join(sorted({self.measures[i] for i in group}))
            rows += [self._row("conflicting_measures", i, name, f"{scope} duplicates measured {values}") for i in group]
        return rows

    def near_rule(self) -> str:
        """What made files near copies, e.g. ``dHash <= 16 of 256 bits or near-copies-2 <= 0.1``."""
        rules = []
        if self.near_duplicate_distance is not None:
            rules.append(f"dHash <= {self.near_duplicate_distance} of 256 bits")
        if self.near_copy_threshold is not None:
            rules.append(f"{near_copies.VERSION} <= {self.near_copy_threshold:g}")
        if self.reviewed_copies:
            rules.append(f"{self.reviewed_copies} pairs reviewed as copies")
        return " or ".join(rules) or "off"

    def copy_counts(self) -> tuple[int, int]:
        """(copy groups of 2+ files, exact and near copies merged; distinct pictures among the good files)."""
        in_near = {i for group in self.near_groups for i in group}
        exact_alone = [group for group in self.exact_groups if group[0] not in in_near]
        contents = len({c.sha256 for c in self.checks if c.problem is None})
        merged = sum(len({self.checks[i].sha256 for i in group}) - 1 for group in self.near_groups)
        return len(self.near_groups) + len(exact_alone), contents - merged

    def _row(self, kind: str, index: int, group: str, detail: str) -> dict[str, str]:
        return {
            "kind": kind,
            "path": self.checks[index].path,
            "label": self.labels[index],
            "group": group,
            "detail": detail,
        }

    def conflict_listing(self, conflicts: Sequence[tuple[str, int]] | None = None) -> list[dict[str, object]]:
        """Every copy group whose members carry different labels (or the ``conflicts`` given), with
        every member's path, label and measurement."""
        listing = []
        for scope, index in self.conflicts if conflicts is None else conflicts:
            group = self.group(scope, index)
            members = [{"path": self.checks[i].path, "label": self.labels[i]} for i in group]
            if self.measures:
                for member, i in zip(members, group, strict=True):
                    member["measure"] = self.measures[i]
            listing.append({"scope": scope, "paths": [m["path"] for m in members], "members": members})
        return listing

    def measure_conflicts(self) -> list[tuple[str, int]]:
        """(scope, group index) of copy groups whose members carry different measurements."""
        if not self.measures:
            return []
        return [
            (scope, index)
            for scope, groups in (("exact", self.exact_groups), ("near", self.near_groups))
            for index, group in enumerate(groups)
            if len({self.measures[i] for i in group}) > 1
        ]

    def summary(self) -> dict[str, object]:
        bad = Counter(self.checks[i].problem for i in self.bad)
        return {
            "files": len(self.checks),
            "class_counts": self.class_counts(),
            "bad_files": len(self.bad),
            "bad_by_kind": dict(sorted(bad.items())),
            "class_counts_without_bad_files": self.class_counts(sorted(set(range(len(self.checks))) - set(self.bad))),
            "distinct_images": len({c.sha256 for c in self.checks if c.problem is None}),
            "exact_duplicate_groups": len(self.exact_groups),
            "exact_duplicate_files": sum(map(len, self.exact_groups)),
            "near_duplicate_groups": len(self.near_groups),
            "near_duplicate_files": sum(map(len, self.near_groups)),
            "near_duplicate_distance": self.near_duplicate_distance,
            "near_copy_finder": near_copies.VERSION,
            "near_copy_threshold": self.near_copy_threshold,
            "reviewed_copy_pairs": self.reviewed_copies,
            "copy_groups": self.copy_counts()[0],
            "distinct_pictures": self.copy_counts()[1],
            "largest_copy_group": max(map(len, self.exact_groups + self.near_groups), default=0),
            "conflicting_label_groups": self.conflict_listing(),
            "conflicting_measure_groups": self.conflict_listing(self.measure_conflicts()),
            **self.colour_and_cameras(),
            "min_size": self.min_size,
            "seconds": round(self.seconds, 3),
        }

    def summary_text(self) -> str:
        s = self.summary()
        counts = ", ".join(f"{name} {count}" for name, count in s["class_counts"].items())
        bad = ", ".join(f"{kind} {count}" for kind, count in s["bad_by_kind"].items()) or "none"
        lines = [
            f"data audit: {s['files']} files ({counts}), {s['distinct_images']} distinct images, {s['seconds']:.1f} s",
            f"  bad files: {s['bad_files']} ({bad})",
            f"  exact duplicates: {s['exact_duplicate_groups']} groups, {s['exact_duplicate_files']} files",
            f"  near duplicates ({self.near_rule()}): {s['near_duplicate_groups']} groups, "
            f"{s['near_duplicate_files']} files",
            f"  copy groups (exact and near merged): {s['copy_groups']}, the largest {s['largest_copy_group']} files; "
            f"distinct pictures: {s['distinct_pictures']}",
            f"  duplicate groups with conflicting labels: {len(self.conflicts)}"
            + (f"; with different measurements: {len(s['conflicting_measure_groups'])}" if self.measures else ""),
        ]
        for scope, index in self.conflicts[:10]:
            named = (f"{Path(self.checks[i].path).name} ({self.labels[i]})" for i in self.group(scope, index))
            lines.append(f"    {scope}: " + " = ".join(named))
        if len(self.conflicts) > 10:
            lines.append(f"    ... {len(self.conflicts) - 10} more in the report")
        lines += [
            f"  colour profiles: {_counts(s['colour_profiles'])}; {s['without_colour_profile']} files without one "
            f"(read as sRGB); {s['unconvertible_colour']} cannot be converted to sRGB",
            f"  cameras (EXIF make and model): {_counts(s['cameras'])}; {s['without_camera']} files without",
        ]
        return "\n".join(lines)

    def write(self, directory: str | Path) -> Path:
        """``audit.csv`` (every finding, with paths) and ``audit.json`` (counts) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / AUDIT_CSV).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["kind", "path", "label", "group", "detail"])
            writer.writeheader()
            writer.writerows(self.rows())
        (directory / AUDIT_JSON).write_text(json.dumps(self.summary(), indent=2) + "\n")
        return directory / AUDIT_CSV

    def bad_files_message(self) -> str:
        """Why training stops (data.bad_files=error): every bad file, and the ways out."""
        checks = [self.checks[i] for i in self.bad]
        listed = "\n".join(f"  {check.problem:<10} {check.path}  ({check.detail})" for check in checks)
        return (
            f"{len(self.bad)} bad file(s) found before training (data.bad_files=error):\n{listed}\n"
            "Replace or remove these files (or their manifest rows), or set data.bad_files=skip to train "
            f"without them; skipped files are listed in the run directory's {EXCLUDED}."
        )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in counts.items()) or "none"


def audit_samples(
    samples: Sequence[Sample], classes: Sequence[str], cfg: DataConfig, reviewed: Sequence[tuple[str, str]] = ()
) -> AuditReport:
    """Check every sample's file (in threads: decoding releases the GIL) and group the duplicates
    as ``cfg`` says. ``reviewed``: pairs of file names (or stems, or paths) known to be copies."""
    side = DEFAULT_INPUT_SIZE if cfg.image_size is None else cfg.image_size  # None: a DataConfig outside a Config
    decode_side, near_copy_threshold = working_size(side), cfg.near_copy_threshold
    started = time.perf_counter()
    paths = [s.path for s in samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        vector = near_copy_threshold is not None
        checks = list(pool.map(lambda p: check_file(p, cfg.min_size, cfg.alpha_background, decode_side, vector), paths))
    checks = [_require_measurement(check, sample) for check, sample in zip(checks, samples, strict=True)]
    good = [i for i, check in enumerate(checks) if check.problem is None]

    by_content: dict[str, list[int]] = defaultdict(list)
    for i in good:
        by_content[checks[i].sha256].append(i)
    exact = [members for members in by_content.values() if len(members) > 1]

    contents = list(by_content.values())
    firsts = [checks[members[0]] for members in contents]
    distance = cfg.near_duplicate_distance
    pairs = [] if distance is None else near_pairs([c.dhash for c in firsts], distance)
    if near_copy_threshold is not None and firsts:
        found = near_copies.near_copy_pairs(np.stack([c.vector for c in firsts]), near_copy_threshold)
        pairs += [(i, j) for i, j, _ in found]
    reviewed_pairs = _reviewed_pairs([[checks[i].path for i in members] for members in contents], reviewed)
    component = connected_groups(len(contents), _pair_keys(len(contents), pairs + reviewed_pairs))
    merged: dict[int, list[int]] = defaultdict(list)
    for k in range(len(contents)):
        merged[int(component[k])].append(k)
    near = [sorted(i for k in ks for i in contents[k]) for ks in merged.values() if len(ks) > 1]
    labels = [class_name(classes, s.label) for s in samples]
    measures = [s.measure for s in samples] if any(s.measure for s in samples) else []
    return AuditReport(
        checks,
        labels,
        exact,
        near,
        cfg.min_size,
        cfg.near_duplicate_distance,
        time.perf_counter() - started,
        near_copy_threshold,
        len(reviewed_pairs),
        measures,
    )


def _require_measurement(check: FileCheck, sample: Sample) -> FileCheck:
    """A readable file whose manifest row has an empty measurement is a bad file (no target, no label)."""
    if check.problem is None and sample.value is not None and math.isnan(sample.value):
        return replace(check, problem=NO_MEASUREMENT, detail="the manifest row's data.measure_column is empty")
    return check


def _reviewed_pairs(contents: Sequence[Sequence[str]], reviewed: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """Content index pairs of the ``reviewed`` name pairs whose files are both present, named by
    path, file name or stem; a name that several different files share names none of them."""
    index: dict[str, set[int]] = defaultdict(set)
    for k, members in enumerate(contents):
        for path in members:
            for name in (path, Path(path).name, Path(path).stem):
                index[name].add(k)
    unique = {name: next(iter(ks)) for name, ks in index.items() if len(ks) == 1}
    found = {tuple(sorted((unique[a], unique[b]))) for a, b in reviewed if a in unique and b in unique}
    return sorted((a, b) for a, b in found if a != b)


def _pair_keys(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[object]]:
    keys: list[list[object]] = [[] for _ in range(n)]
    for number, (a, b) in enumerate(pairs):
        keys[a].append(number)
        keys[b].append(number)
    return keys


def audit_data(cfg: DataConfig) -> tuple[list[Sample], list[str], AuditReport]:
    """Every sample the config names, and the audit of their files (what ``anemia-dist audit-data`` runs)."""
    samples, classes = load_samples(cfg)
    reviewed = [] if cfg.copy_review is None else near_copies.read_review(review_path(cfg.copy_review))
    report = audit_samples(samples, classes, cfg, [(a, b) for a, b, verdict in reviewed if verdict == "copy"])
    return samples, classes, report

"""Leakage between two sets: every exact and near copy of a test image among the training images.

``anemia-dist audit-data --compare TRAIN TEST`` (is this "external" test set really new? does a
published split hold?). Each set is a folder of class folders, a manifest CSV (read with the
config's ``data.*`` columns), or a run's ``splits.csv`` (its train rows as TRAIN, its val rows as
TEST). Both sets are checked as the audit checks files, then compared across: the same bytes, a
dHash within ``data.near_duplicate_distance`` bits, the near-copy finder within
``data.near_copy_threshold`` (mirrors, turns, re-cuts, rescales, re-encodes), and pairs reviewed
as copies (``data.copy_review``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import near_copies
from .audit import AuditReport, audit_samples, near_pairs
from .config import DataConfig, review_path
from .errors import DataError
from .run_dir import SPLITS
from .sources import Sample, find_image_files, read_manifest, scan_image_folder

COMPARE_CSV, COMPARE_JSON = "compare.csv", "compare.json"
RUN_SPLITS_COLUMNS = {"path", "label", "split", "unit"}
"""Columns that mark a CSV as a run's split listing (read with its own columns, not the config's)."""
UNLABELLED = ""
"""The label of an image from a flat folder (no class folders)."""
FIELDS = ["kind", "train_path", "train_label", "test_path", "test_label", "dhash_bits", "distance"]


@dataclass
class LabelledSet:
    """One side of the comparison: the files, their labels (class names) and their audit."""

    name: str
    paths: list[str]
    labels: list[str]
    report: AuditReport | None = None


def load_set(spec: str, side: str, cfg: DataConfig) -> LabelledSet:
    """``spec``: a folder, a manifest CSV, or a run's splits.csv (or its run folder); ``side``
    (``train``/``test``) picks a splits.csv's train or val rows."""
    path = Path(spec)
    if path.is_dir() and (path / SPLITS).is_file():
        path = path / SPLITS
    if path.is_dir() and not any(child.is_dir() for child in path.iterdir()):
        files = [str(file) for file in find_image_files(path)]  # a flat folder: no labels
        return LabelledSet(str(spec), files, [UNLABELLED] * len(files))
    if path.is_dir():
        samples, classes = scan_image_folder(str(path), None)
    elif path.is_file():
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = set(next(csv.reader(handle), []))
        run_splits = RUN_SPLITS_COLUMNS <= header
        samples, classes = read_manifest(path, None, None, DataConfig() if run_splits else cfg)
        if run_splits:
            wanted = "train" if side == "train" else "val"
            samples = [s for s in samples if s.split == wanted]
    else:
        raise DataError(f"audit-data --compare: {spec} is neither a folder nor a CSV file; give one of each set")
    if not samples:
        raise DataError(f"audit-data --compare: {spec} holds no {side} images")
    return LabelledSet(str(spec), [s.path for s in samples], [classes[s.label] for s in samples])


def check(found: LabelledSet, cfg: DataConfig) -> LabelledSet:
    """``found`` with its audit: every file read, hashed and given its near-copy vector."""
    classes = sorted(set(found.labels))
    samples = [Sample(path, classes.index(label), path) for path, label in zip(found.paths, found.labels, strict=True)]
    report = audit_samples(samples, classes, cfg)
    return replace(found, report=report)


def _dhash_bits(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def cross_copies(
    train: LabelledSet, test: LabelledSet, cfg: DataConfig, reviewed: Sequence[tuple[str, str]] = ()
) -> list[dict[str, object]]:
    """Every (training file, test file) pair that is an exact or near copy, with both paths and
    labels, the dHash distance in bits and the finder's distance; sorted by test path."""
    a, b = train.report.checks, test.report.checks
    good_a = [i for i, c in enumerate(a) if c.problem is None]
    good_b = [j for j, c in enumerate(b) if c.problem is None]
    pairs: set[tuple[int, int]] = set()
    by_content: dict[str, list[int]] = {}
    for i in good_a:
        by_content.setdefault(a[i].sha256, []).append(i)
    pairs |= {(i, j) for j in good_b for i in by_content.get(b[j].sha256, [])}
    if cfg.near_duplicate_distance is not None:
        hashes = [a[i].dhash for i in good_a] + [b[j].dhash for j in good_b]
        found = near_pairs(hashes, cfg.near_duplicate_distance)
        pairs |= {(good_a[p], good_b[q - len(good_a)]) for p, q in found if p < len(good_a) <= q}
    finder = cfg.near_copy_threshold is not None  # else the files have no vectors
    vectors_a = np.stack([a[i].vector for i in good_a]) if finder and good_a else np.zeros((0, near_copies.DIMENSIONS))
    vectors_b = np.stack([b[j].vector for j in good_b]) if finder and good_b else np.zeros((0, near_copies.DIMENSIONS))
    if finder:
        found = near_copies.cross_pairs(vectors_a, vectors_b, cfg.near_copy_threshold)
        pairs |= {(good_a[p], good_b[q]) for p, q, _ in found}
    pairs |= _reviewed(a, b, good_a, good_b, reviewed)
    row_of_a, row_of_b = {i: k for k, i in enumerate(good_a)}, {j: k for k, j in enumerate(good_b)}
    rows = []
    for i, j in pairs:
        pair = (vectors_a[row_of_a[i]][None], vectors_b[row_of_b[j]][None]) if finder else None
        distance = round(float(near_copies.distances(*pair)[0, 0]), 4) if pair else ""
        rows.append(
            {
                "kind": "exact" if a[i].sha256 == b[j].sha256 else "near",
                "train_path": a[i].path,
                "train_label": train.labels[i],
                "test_path": b[j].path,
                "test_label": test.labels[j],
                "dhash_bits": _dhash_bits(a[i].dhash, b[j].dhash),
                "distance": distance,
            }
        )
    return sorted(rows, key=lambda row: (row["test_path"], str(row["distance"]), row["train_path"]))


def _reviewed(a, b, good_a, good_b, reviewed: Sequence[tuple[str, str]]) -> set[tuple[int, int]]:
    """(training, test) index pairs of the pairs reviewed as copies, either order, named by path,
    file name or stem; a name that several files of one set share names none of them."""

    def names(checks, good) -> dict[str, int]:
        index: dict[str, set[int]] = {}
        for i in good:
            for name in {checks[i].path, Path(checks[i].path).name, Path(checks[i].path).stem}:
                index.setdefault(name, set()).add(i)
        return {name: next(iter(found)) for name, found in index.items() if len(found) == 1}

    in_a, in_b = names(a, good_a), names(b, good_b)
    pairs = [*reviewed, *((y, x) for x, y in reviewed)]
    return {(in_a[x], in_b[y]) for x, y in pairs if x in in_a and y in in_b}


def compare(train_spec: str, test_spec: str, cfg: DataConfig) -> tuple[list[dict[str, object]], dict]:
    """Load and check both sets, and return (:func:`cross_copies`, :func:`summary`)."""
    reviewed = [] if cfg.copy_review is None else near_copies.read_review(review_path(cfg.copy_review))
    train, test = (check(load_set(spec, side, cfg), cfg) for spec, side in ((train_spec, "train"), (test_spec, "test")))
    rows = cross_copies(train, test, cfg, [(a, b) for a, b, verdict in reviewed if verdict == "copy"])
    return rows, summary(train, test, rows, cfg)


def summary(train: LabelledSet, test: LabelledSet, rows: Sequence[dict[str, object]], cfg: DataConfig) -> dict:
    """Counts for compare.json: the sets, the rules, the copies found."""
    return {
        "train": {"source": train.name, "files": len(train.paths), "bad_files": len(train.report.bad)},
        "test": {"source": test.name, "files": len(test.paths), "bad_files": len(test.report.bad)},
        "near_duplicate_distance": cfg.near_duplicate_distance,
        "near_copy_finder": near_copies.VERSION,
        "near_copy_threshold": cfg.near_copy_threshold,
        "exact_pairs": sum(row["kind"] == "exact" for row in rows),
        "near_pairs": sum(row["kind"] == "near" for row in rows),
        "test_files_with_a_copy_in_train": len({row["test_path"] for row in rows}),
        "pairs_with_different_labels": sum(row["train_label"] != row["test_label"] for row in rows),
    }


def write(directory: str | Path, rows: Sequence[dict[str, object]], counts: dict) -> Path:
    """``compare.csv`` (every pair, with paths, labels and distances) and ``compare.json`` (counts)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / COMPARE_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (directory / COMPARE_JSON).write_text(json.dumps(counts, indent=2) + "\n")
    return directory / COMPARE_CSV


def text(rows: Sequence[dict[str, object]], counts: dict, shown: int = 20) -> str:
    """What the command prints: the counts and the first ``shown`` pairs."""
    lines = [
        f"compare: train {counts['train']['source']} ({counts['train']['files']} files, "
        f"{counts['train']['bad_files']} bad), test {counts['test']['source']} ({counts['test']['files']} files, "
        f"{counts['test']['bad_files']} bad; bad files are not compared: anemia-dist audit-data lists them)",
        f"  {counts['exact_pairs']} exact and {counts['near_pairs']} near copies across the sets; "
        f"{counts['test_files_with_a_copy_in_train']} test files have a copy in train, "
        f"{counts['pairs_with_different_labels']} pairs with different labels",
    ]
    for row in rows[:shown]:
        lines.append(
            f"  {row['kind']:<5} {row['test_path']}{_label(row['test_label'])}"
            f" = {row['train_path']}{_label(row['train_label'])}"
            f"  dHash {row['dhash_bits']} bits, distance {row['distance']}"
        )
    if len(rows) > shown:
        lines.append(f"  ... {len(rows) - shown} more in the report")
    return "\n".join(lines)


def _label(label: object) -> str:
    return f" ({label})" if label else ""

"""Where the samples come from: an ImageFolder root, or a CSV manifest whose label is a class
name or a measurement against a threshold (e.g. haemoglobin below 11 g/dL).

A :class:`Sample` is one image file with its label, patient group, site and any fixed split.
Nothing here opens an image: the audit (:mod:`anemia_dist.audit`) checks every file next.
"""

from __future__ import annotations

import csv
import math
import operator
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config import DataConfig, parse_condition
from .errors import ConfigError, DataError
from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    group: str
    """Patient (or other unit) that must stay on one side of a split; the path when unknown."""
    site: str = ""
    """Site (e.g. hospital) from data.site_column; empty when not grouped by site."""
    split: str = ""
    """``train``/``val`` when fixed by the manifest's split column or a separate validation source."""
    unit: str = ""
    """Split unit: the patient group merged with every duplicate and site it is linked to."""
    measure: str = ""
    """The manifest's measurement (data.measure_column, e.g. Hb in g/dL) as written; empty without one."""
    value: float | None = None
    """The measurement as a number; NaN when the row has none (an audit finding, ``no_measurement``);
    None without a measure column."""
    threshold: float | None = None
    """The row's decision threshold (data.threshold/threshold_column/threshold_rules); None without one."""


NO_LABEL = -1
"""The label index of a row whose measurement is missing: it has no class (the audit lists it)."""


def class_name(classes: Sequence[str], label: int) -> str:
    """A label index's class name; "" for :data:`NO_LABEL`."""
    return classes[label] if label != NO_LABEL else ""


MISSING = "\0missing"
""":func:`row_label` of a row without a measurement (no class name can look like it)."""


def find_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by extension), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_index(classes: Sequence[str] | None, found: Sequence[str], where: str) -> list[str]:
    if classes is None:
        return sorted(found)
    missing = sorted(set(found) - set(classes))
    if missing:
        raise DataError(f"{where}: labels {missing} are not in data.classes={list(classes)}; add them or fix the data")
    return list(classes)


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """ImageFolder layout: ``root/<class>/<image>``; every image file is its own group."""
    root = Path(os.path.abspath(root))  # absolute: splits.csv must work from any folder
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        absent = [c for c in classes if c not in folders]
        if absent:
            raise DataError(f"{root}: no sub-folder for class(es) {absent}; found {folders}")
        folders = [f for f in folders if f in classes]
    names = _class_index(classes, folders, str(root))
    if len(names) < 2:
        raise DataError(f"{root}: need one sub-folder per class (at least two), found {folders}")
    samples = []
    for index, name in enumerate(names):
        files = find_image_files(root / name)
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this class folder")
        samples += [Sample(str(p), index, str(p)) for p in files]
    return samples, names


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


def _number(row: dict[str, str], column: str, where: str) -> float:
    text = (row.get(column) or "").strip()
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"{where}: column {column!r} holds {text!r}, not a number; fix the value or remove the row"
        ) from None


def condition_holds(row: dict[str, str], condition: str, where: str) -> bool:
    column, op, value = parse_condition(condition, where)
    if column not in row:
        raise DataError(f"{where}: condition {condition!r} names column {column!r}, which the manifest lacks")
    left, right = row[column].strip(), value.strip().strip("'\"")
    try:
        return _OPS[op](float(left), float(right))
    except ValueError:
        if op not in ("==", "!="):
            raise DataError(f"{where}: {condition!r} compares {left!r} with {op}, which needs numbers") from None
        return _OPS[op](left, right)


def _threshold(row: dict[str, str], cfg: DataConfig, where: str) -> float:
    if cfg.threshold is not None:
        return cfg.threshold
    if cfg.threshold_column is not None:
        return _number(row, cfg.threshold_column, where)
    for rule in cfg.threshold_rules:
        if all(condition_holds(row, condition, where) for condition in rule.when):
            return rule.threshold
    raise DataError(f"{where}: no rule in data.threshold_rules matches this row; add a rule that covers it")


def row_threshold(row: dict[str, str], cfg: DataConfig, where: str) -> float | None:
    """The row's decision threshold, or None when the config sets no threshold source."""
    if cfg.threshold is None and cfg.threshold_column is None and not cfg.threshold_rules:
        return None
    return _threshold(row, cfg, where)


def row_measure(row: dict[str, str], cfg: DataConfig, where: str) -> float | None:
    """data.measure_column's value; NaN when empty (a finding, not an error); None without the column."""
    if cfg.measure_column is None:
        return None
    if not (row.get(cfg.measure_column) or "").strip():
        return math.nan
    return _number(row, cfg.measure_column, where)


def row_label(row: dict[str, str], cfg: DataConfig, where: str) -> str:
    """The class name of one manifest row: its label column, or its measurement against the threshold
    (:data:`MISSING` when the measurement is empty)."""
    if cfg.measure_column is None:
        return (row.get(cfg.label_column) or "").strip()
    measure = row_measure(row, cfg, where)
    if math.isnan(measure):
        return MISSING
    return cfg.below_label if measure < _threshold(row, cfg, where) else cfg.above_label


class _ImageIndex:
    """Image files under a folder by file name and by stem, for manifests that list image IDs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: dict[str, list[Path]] | None = None

    def find(self, name: str) -> Path | None:
        if self.names is None:
            self.names = defaultdict(list)
            for path in find_image_files(self.folder):
                self.names[path.name].append(path)
                self.names[path.stem].append(path)
        found = self.names.get(name, [])
        if len(found) > 1:
            listed = [str(p) for p in found]
            raise DataError(f"{self.folder}: image ID {name!r} matches {len(found)} files {listed}; list paths instead")
        return found[0] if found else None


def _check_columns(manifest: Path, header: list[str], cfg: DataConfig, group_column: str | None) -> None:
    columns = {
        "data.path_column": cfg.path_column,
        "data.label_column/measure_column": cfg.measure_column or cfg.label_column,
        "data.group_column": group_column,
        "data.site_column": cfg.site_column,
        "data.threshold_column": cfg.threshold_column,
    }
    for key, column in columns.items():
        if column is not None and column not in header:
            raise DataError(f"{manifest}: {key}={column!r} is not a column; the CSV has {header}")


def read_manifest(
    manifest: str | Path,
    classes: Sequence[str] | None = None,
    group_column: str | None = None,
    columns: DataConfig | None = None,
) -> tuple[list[Sample], list[str]]:
    """A CSV with a path (or image ID) column, a label or measurement column, and optionally group,
    site and split columns (a column named ``group``/``split`` is used when present).

    Relative paths are resolved against the CSV's folder. A listed file that does not exist is kept:
    the audit reports it as ``missing``, so it is never dropped silently.
    """
    cfg = columns or DataConfig()
    manifest = Path(os.path.abspath(manifest))  # absolute: splits.csv must work from any folder
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest CSV does not exist")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    _check_columns(manifest, header, cfg, group_column)
    if not rows:
        raise DataError(f"{manifest}: no rows")
    label_source = cfg.measure_column or cfg.label_column
    group_key = group_column or ("group" if "group" in header else None)
    split_key = "split" if "split" in header else None
    index = _ImageIndex(manifest.parent)
    labels, samples = [], []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest}, line {line}"
        label = row_label(row, cfg, where)
        if not label:
            raise DataError(f"{where}: empty {label_source!r}; fill it in or remove the row")
        value = (row.get(cfg.path_column) or "").strip()
        if not value:
            raise DataError(f"{where}: empty {cfg.path_column!r}; fill it in or remove the row")
        path = Path(value) if Path(value).is_absolute() else manifest.parent / value
        if not path.is_file():
            path = index.find(value) or path
        split = (row.get(split_key) or "").strip().lower() if split_key else ""
        if split_key and split not in ("train", "val"):
            raise DataError(
                f"{where}: split {row.get(split_key)!r} must be train or val; keep test rows in their own manifest"
            )
        group = (row.get(group_key) or "").strip() if group_key else ""
        site = (row.get(cfg.site_column) or "").strip() if cfg.site_column else ""
        labels.append(label)
        measure = (row.get(cfg.measure_column) or "").strip() if cfg.measure_column else ""
        value, threshold = row_measure(row, cfg, where), row_threshold(row, cfg, where)
        samples.append(
            Sample(str(path), -1, group or str(path), site, split, measure=measure, value=value, threshold=threshold)
        )
    found = {cfg.below_label, cfg.above_label} if cfg.measure_column else set(labels)
    names = _class_index(classes, sorted(found), str(manifest))
    indices = [NO_LABEL if label == MISSING else names.index(label) for label in labels]
    return [replace(s, label=index) for s, index in zip(samples, indices, strict=True)], names


def load_source(
    root: str | None,
    manifest: str | None,
    classes: Sequence[str] | None,
    group_column: str | None,
    columns: DataConfig | None = None,
) -> tuple[list[Sample], list[str]]:
    """Samples from a manifest (columns and label rule from ``columns``) or an ImageFolder root."""
    if manifest is not None:
        return read_manifest(manifest, classes, group_column, columns)
    if group_column is not None:
        raise ConfigError(
            "data.group_column: groups come from a manifest column; use data.manifest with a group column"
        )
    return scan_image_folder(root, classes)


def load_samples(cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    """Every sample the config names; those from data.val_root/val_manifest carry split ``val``."""
    cfg.require_source()
    samples, classes = load_source(cfg.root, cfg.manifest, cfg.classes, cfg.group_column, cfg)
    if cfg.val_root is None and cfg.val_manifest is None:
        return samples, classes
    val, _ = load_source(cfg.val_root, cfg.val_manifest, classes, cfg.group_column, cfg)
    return [replace(s, split="train") for s in samples] + [replace(s, split="val") for s in val], classes

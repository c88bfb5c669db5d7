"""Data sources, the audit-aware train/validation split and the datasets the loaders read.

Sources: an ImageFolder root, or a CSV manifest whose label is a class name or comes from a
measurement (e.g. haemoglobin below a threshold). Before splitting, every file is audited
(:mod:`anemia_dist.audit`); bad files stop the run or are excluded, by ``data.bad_files``. Patient
groups, byte-identical copies, near duplicates and (optionally) sites are merged into split units,
and whole units go to one side of a stratified group k-fold split.
"""

from __future__ import annotations

import csv
import operator
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_class_weight

from .audit import AuditReport, audit_samples, connected_groups
from .config import ConfigError, DataConfig, parse_condition
from .distributed import broadcast_from_main
from .images import IMAGE_EXTENSIONS, load_rgb, working_size


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


@dataclass(frozen=True)
class Exclusion:
    sample: Sample
    reason: str
    detail: str


@dataclass
class SplitData:
    train: list[Sample]
    val: list[Sample]
    classes: list[str]
    excluded: list[Exclusion] = field(default_factory=list)
    """Files left out by data.bad_files=skip or data.duplicates=first, with the reason."""
    audit: AuditReport | None = None


class DataError(ValueError):
    """Unusable data; the message names the file and what to do."""


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
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
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


def _holds(row: dict[str, str], condition: str, where: str) -> bool:
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
        if all(_holds(row, condition, where) for condition in rule.when):
            return rule.threshold
    raise DataError(f"{where}: no rule in data.threshold_rules matches this row; add a rule that covers it")


def row_label(row: dict[str, str], cfg: DataConfig, where: str) -> str:
    """The class name of one manifest row: its label column, or its measurement against the threshold."""
    if cfg.measure_column is None:
        return (row.get(cfg.label_column) or "").strip()
    below = _number(row, cfg.measure_column, where) < _threshold(row, cfg, where)
    return cfg.below_label if below else cfg.above_label


class _ImageIndex:
    """Image files under a folder by file name and by stem, for manifests that list image IDs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: dict[str, list[Path]] | None = None

    def find(self, name: str) -> Path | None:
        if self.names is None:
            self.names = defaultdict(list)
            for path in sorted(self.folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.names[path.name].append(path)
                    self.names[path.stem].append(path)
        found = self.names.get(name, [])
        if len(found) > 1:
            raise DataError(
                f"{self.folder}: image ID {name!r} matches {len(found)} files {[str(p) for p in found]}; list paths instead"
            )
        return found[0] if found else None


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
    label_source = cfg.measure_column or cfg.label_column
    needed = {"data.path_column": cfg.path_column, "data.label_column/measure_column": label_source}
    optional = {
        "data.group_column": group_column,
        "data.site_column": cfg.site_column,
        "data.threshold_column": cfg.threshold_column,
    }
    for key, column in [*needed.items(), *optional.items()]:
        if column is not None and column not in header:
            raise DataError(f"{manifest}: {key}={column!r} is not a column; the CSV has {header}")
    if not rows:
        raise DataError(f"{manifest}: no rows")
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
        samples.append(Sample(str(path), -1, group or str(path), site, split))
    found = {cfg.below_label, cfg.above_label} if cfg.measure_column else set(labels)
    names = _class_index(classes, sorted(found), str(manifest))
    return [replace(s, label=names.index(label)) for s, label in zip(samples, labels)], names


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


def audit_data(cfg: DataConfig) -> tuple[list[Sample], list[str], AuditReport]:
    samples, classes = load_samples(cfg)
    report = audit_samples(
        samples, classes, cfg.min_size, cfg.near_duplicate_distance, cfg.alpha_background, working_size(cfg.image_size)
    )
    return samples, classes, report


def bad_files_message(report: AuditReport) -> str:
    listed = "\n".join(
        f"  {report.checks[i].problem:<10} {report.checks[i].path}  ({report.checks[i].detail})" for i in report.bad
    )
    return (
        f"{len(report.bad)} bad file(s) found before training (data.bad_files=error):\n{listed}\n"
        "Replace or remove these files (or their manifest rows), or set data.bad_files=skip to train "
        "without them; skipped files are listed in the run directory's excluded.csv."
    )


def _exclusions(cfg: DataConfig, report: AuditReport) -> dict[int, tuple[str, str]]:
    """Sample index -> (reason, detail) for the files this config leaves out."""
    if report.bad and cfg.bad_files == "error":
        raise DataError(bad_files_message(report))
    excluded = {i: (report.checks[i].problem, report.checks[i].detail) for i in report.bad}
    if cfg.duplicates == "first":
        groups = report.exact_groups + report.near_groups
        linked = connected_groups(len(groups), groups)  # groups sharing a file are one cluster
        members: dict[int, set[int]] = defaultdict(set)
        for g, group in enumerate(groups):
            members[int(linked[g])].update(group)
        for group in members.values():
            ordered = sorted(group, key=lambda i: report.checks[i].path)
            if len({report.labels[i] for i in ordered}) > 1:
                excluded.update({i: ("conflicting_labels", "copies carry different labels") for i in ordered})
            else:
                first = report.checks[ordered[0]].path
                excluded.update({i: ("duplicate_copy", f"copy of {first}") for i in ordered[1:]})
    return excluded


def assign_units(samples: Sequence[Sample], report: AuditReport, indices: Sequence[int], by_site: bool) -> list[Sample]:
    """Merge patient groups, identical files, near duplicates and (optionally) sites into split units."""
    near_of = {i: g for g, group in enumerate(report.near_groups) for i in group}
    keys = []
    for i in indices:
        sample_keys: list[object] = [("group", samples[i].group), ("content", report.checks[i].sha256)]
        if i in near_of:
            sample_keys.append(("near", near_of[i]))
        if by_site:
            sample_keys.append(("site", samples[i].site))
        keys.append(sample_keys)
    units = connected_groups(len(indices), keys)
    return [replace(samples[i], unit=f"u{unit:05d}") for i, unit in zip(indices, units)]


def _fixed_split(samples: Sequence[Sample], cfg: DataConfig) -> tuple[list[Sample], list[Sample]]:
    if cfg.fold != 0 or cfg.folds is not None:
        raise DataError(
            "data.fold/data.folds: the split is fixed by the manifest's split column or data.val_*; drop one"
        )
    if not all(s.split for s in samples):
        raise DataError("some manifest rows have an empty split; give every row train or val")
    sides = defaultdict(set)
    for s in samples:
        sides[s.unit].add(s.split)
    crossing = [u for u, found in sides.items() if len(found) > 1]
    if crossing:
        listed = "\n  ".join(", ".join(f"{s.path} ({s.split})" for s in samples if s.unit == u) for u in crossing[:20])
        raise DataError(
            f"{len(crossing)} group(s) of the same patient or duplicate images sit in both train and val:\n  {listed}\n"
            "Move each group to one side, or set data.duplicates=first to keep one copy of each duplicate."
        )
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "val"]


def _fold_split(
    samples: Sequence[Sample], classes: Sequence[str], cfg: DataConfig, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Stratified group k-fold over split units; fold ``data.fold`` is validation, reproducible per seed."""
    folds = cfg.folds or max(2, round(1.0 / cfg.val_fraction))
    labels = np.array([s.label for s in samples])
    units = np.array([s.unit for s in samples])
    for label in np.unique(labels):
        n_units = len(np.unique(units[labels == label]))
        if n_units < folds:
            raise DataError(
                f"class {classes[label]!r} spans only {n_units} split unit(s) (patients, duplicates and sites merged); "
                f"{folds} folds need at least {folds}. Add data, use fewer folds (data.folds / data.val_fraction)"
                + (
                    ", or set data.duplicates=first: duplicates listed under several sites tie those sites together"
                    if cfg.site_column
                    else ""
                )
                + "."
            )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(np.zeros(len(samples)), labels, units))[cfg.fold]
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def build_split(cfg: DataConfig, seed: int) -> SplitData:
    """Load, audit, exclude by policy, merge units, split: the same result on every call for a seed."""
    samples, classes, report = audit_data(cfg)
    excluded = _exclusions(cfg, report)
    kept = assign_units(
        samples, report, [i for i in range(len(samples)) if i not in excluded], cfg.site_column is not None
    )
    if not kept:
        raise DataError("every file was excluded; see the audit (anemia-dist audit-data)")
    fixed = any(s.split for s in kept)
    train, val = _fixed_split(kept, cfg) if fixed else _fold_split(kept, classes, cfg, seed)
    missing = sorted(set(range(len(classes))) - {s.label for s in train})
    if missing:
        raise DataError(f"classes {[classes[i] for i in missing]} have no training images")
    if not val:
        raise DataError("the validation split is empty; add data or give data.val_root/data.val_manifest")
    exclusions = [Exclusion(samples[i], reason, detail) for i, (reason, detail) in sorted(excluded.items())]
    return SplitData(train, val, classes, exclusions, report)


def build_split_on_main(cfg: DataConfig, seed: int, is_main: bool) -> SplitData:
    """The main process audits and splits; every rank gets its result, or its error.

    Sharing the error too means a bad file stops every rank before training, together, instead of
    leaving the others waiting at the broadcast.
    """
    result: SplitData | Exception | None = None
    if is_main:
        try:
            result = build_split(cfg, seed)
        except Exception as error:  # re-raised on every rank below
            result = error
    result = broadcast_from_main(result)
    if isinstance(result, Exception):
        raise result
    return result


def balanced_class_weights(train: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' weights, n / (k * count), from the training split only (after exclusions)."""
    labels = np.array([s.label for s in train])
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def split_rows(split: SplitData) -> list[dict[str, str]]:
    return [
        {
            "path": s.path,
            "label": split.classes[s.label],
            "group": s.group,
            "site": s.site,
            "unit": s.unit,
            "split": name,
        }
        for name, part in (("train", split.train), ("val", split.val))
        for s in part
    ]


def excluded_rows(split: SplitData) -> list[dict[str, str]]:
    return [
        {"path": e.sample.path, "label": split.classes[e.sample.label], "reason": e.reason, "detail": e.detail}
        for e in split.excluded
    ]


def describe_split(split: SplitData, run_dir: Path) -> str:
    """The audit summary, what was left out (and where it is listed), and the split, for the log."""

    def counts(part: Sequence[Sample]) -> str:
        found = np.bincount([s.label for s in part], minlength=len(split.classes))
        return ", ".join(f"{name} {n}" for name, n in zip(split.classes, found))

    lines = [split.audit.summary_text()] if split.audit else []
    if split.excluded:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(Counter(e.reason for e in split.excluded).items()))
        lines.append(
            f"  left out {len(split.excluded)} file(s) ({reasons}), listed in {Path(run_dir) / 'excluded.csv'}"
        )
    units = len({s.unit for s in split.train + split.val})
    lines.append(
        f"  split: train {len(split.train)} ({counts(split.train)}), val {len(split.val)} ({counts(split.val)}), "
        f"{units} split units"
    )
    return "\n".join(lines)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs decoded with :func:`load_rgb`."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, background: Sequence[int]):
        self.samples = list(samples)
        self.transform = transform
        self.background = tuple(background)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path, self.background)), sample.label

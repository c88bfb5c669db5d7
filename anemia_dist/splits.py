"""The leak-free train/validation split, decided on the main process and shared with every rank.

The audit's findings decide what is left out (``data.bad_files``, ``data.duplicates``); patient
groups, byte-identical copies, near duplicates and (optionally) sites are merged into split
units; whole units go to one side of a stratified group k-fold (or a fixed split is checked for
units that straddle it). The class weights come from the training side only.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_class_weight

from .audit import AuditReport, audit_data, connected_groups
from .config import DataConfig
from .distributed import decided_on_main
from .errors import DataError
from .sources import Sample, class_name


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


def audit_exclusions(cfg: DataConfig, report: AuditReport) -> dict[int, tuple[str, str]]:
    """Sample index -> (reason, detail) for the files this config leaves out."""
    if report.bad and cfg.bad_files == "error":
        raise DataError(report.bad_files_message())
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
    return [replace(samples[i], unit=f"u{unit:05d}") for i, unit in zip(indices, units, strict=True)]


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
    folds = cfg.fold_count
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
    excluded = audit_exclusions(cfg, report)
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
    return decided_on_main(lambda: build_split(cfg, seed), is_main)


def balanced_class_weights(train: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' weights, n / (k * count), from the training split only (after exclusions)."""
    labels = np.array([s.label for s in train])
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


MEASURE_COLUMN, THRESHOLD_COLUMN = "measure", "threshold"
"""splits.csv's columns for each sample's measurement and threshold, when the data has them."""


def split_rows(split: SplitData) -> list[dict[str, str]]:
    """splits.csv: path, label, group, site, unit, split, and the measure and threshold when the data has them."""
    measured = any(s.value is not None for s in split.train + split.val)
    return [
        {
            "path": s.path,
            "label": split.classes[s.label],
            "group": s.group,
            "site": s.site,
            "unit": s.unit,
            "split": name,
            **({MEASURE_COLUMN: s.value, THRESHOLD_COLUMN: s.threshold} if measured else {}),
        }
        for name, part in (("train", split.train), ("val", split.val))
        for s in part
    ]


def excluded_rows(split: SplitData) -> list[dict[str, str]]:
    return [
        {
            "path": e.sample.path,
            "label": class_name(split.classes, e.sample.label),
            "reason": e.reason,
            "detail": e.detail,
        }
        for e in split.excluded
    ]


def describe_split(split: SplitData, excluded_listing: Path) -> str:
    """The audit summary, what was left out (and where it is listed), and the split, for the log."""

    def counts(part: Sequence[Sample]) -> str:
        found = np.bincount([s.label for s in part], minlength=len(split.classes))
        return ", ".join(f"{name} {n}" for name, n in zip(split.classes, found, strict=True))

    lines = [split.audit.summary_text()] if split.audit else []
    if split.excluded:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(Counter(e.reason for e in split.excluded).items()))
        lines.append(f"  left out {len(split.excluded)} file(s) ({reasons}), listed in {excluded_listing}")
    units = len({s.unit for s in split.train + split.val})
    lines.append(
        f"  split: train {len(split.train)} ({counts(split.train)}), val {len(split.val)} ({counts(split.val)}), "
        f"{units} split units"
    )
    return "\n".join(lines)

"""Data sources, the train/validation split and the datasets the loaders read."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_class_weight

from .config import ConfigError, DataConfig
from .images import IMAGE_EXTENSIONS, load_rgb


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    group: str
    """Patient (or other unit) that must stay on one side of a split; the path when unknown."""


@dataclass
class SplitData:
    train: list[Sample]
    val: list[Sample]
    classes: list[str]


class DataError(ValueError):
    """Unusable data; the message names the file and what to do."""


def _class_index(classes: Optional[Sequence[str]], found: Sequence[str], where: str) -> list[str]:
    if classes is None:
        return sorted(found)
    missing = sorted(set(found) - set(classes))
    if missing:
        raise DataError(f"{where}: labels {missing} are not in data.classes={list(classes)}; add them or fix the data")
    return list(classes)


def scan_image_folder(root: str | Path, classes: Optional[Sequence[str]] = None) -> tuple[list[Sample], list[str]]:
    """ImageFolder layout: ``root/<class>/<image>``; every image file is its own group."""
    root = Path(root)
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
        files = sorted(
            p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this class folder")
        samples += [Sample(str(p), index, str(p)) for p in files]
    return samples, names


def read_manifest(
    manifest: str | Path, classes: Optional[Sequence[str]] = None, group_column: Optional[str] = None
) -> tuple[list[Sample], list[str]]:
    """CSV with ``path,label`` and optionally a group column (default name: ``group``).

    Relative paths are resolved against the CSV's folder; a missing file is an error, never a
    silent drop, since dropped images would shift the split and the class weights.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest CSV does not exist")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    for column in ("path", "label"):
        if column not in columns:
            raise DataError(f"{manifest}: missing column {column!r}; found {columns} (need path,label[,group])")
    if group_column is not None and group_column not in columns:
        raise DataError(f"{manifest}: data.group_column={group_column!r} is not a column; found {columns}")
    group_key = group_column or ("group" if "group" in columns else None)
    if not rows:
        raise DataError(f"{manifest}: no rows")
    names = _class_index(classes, {row["label"] for row in rows}, str(manifest))
    samples, missing = [], []
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        if not path.is_absolute():
            path = manifest.parent / path
        if not path.is_file():
            missing.append(f"line {line}: {path}")
        group = (row.get(group_key) or "").strip() if group_key else ""
        samples.append(Sample(str(path), names.index(row["label"]), group or str(path)))
    if missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise DataError(f"{manifest}: {len(missing)} listed file(s) do not exist:\n  {listed}\nFix the paths or remove the rows.")
    return samples, names


def load_source(
    root: Optional[str], manifest: Optional[str], classes: Optional[Sequence[str]], group_column: Optional[str]
) -> tuple[list[Sample], list[str]]:
    if manifest is not None:
        return read_manifest(manifest, classes, group_column)
    if group_column is not None:
        raise ConfigError("data.group_column: groups come from a manifest column; use data.manifest with a group column")
    return scan_image_folder(root, classes)


def split_train_val(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified by label, whole groups on one side, reproducible for a seed.

    StratifiedGroupKFold with k = round(1 / val_fraction) folds; the first fold is validation.
    """
    n_splits = max(2, round(1.0 / val_fraction))
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    for label in np.unique(labels):
        n_groups = len(np.unique(groups[labels == label]))
        if n_groups < n_splits:
            raise DataError(
                f"class index {label} has only {n_groups} group(s); a {val_fraction:.0%} validation split needs "
                f"at least {n_splits}. Add data, raise data.val_fraction or give data.val_root/data.val_manifest."
            )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def build_split(cfg: DataConfig, seed: int) -> SplitData:
    cfg.require_source()
    samples, classes = load_source(cfg.root, cfg.manifest, cfg.classes, cfg.group_column)
    if cfg.val_root is None and cfg.val_manifest is None:
        train, val = split_train_val(samples, cfg.val_fraction, seed)
    else:
        val, _ = load_source(cfg.val_root, cfg.val_manifest, classes, cfg.group_column)
        train = samples
        shared = {s.group for s in train} & {s.group for s in val}
        if cfg.group_column and shared:
            raise DataError(f"groups {sorted(shared)[:10]} appear in both the training and the validation data")
    missing = sorted(set(range(len(classes))) - {s.label for s in train})
    if missing:
        raise DataError(f"classes {[classes[i] for i in missing]} have no training images")
    return SplitData(train, val, classes)


def balanced_class_weights(train: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' weights, n / (k * count), from the training split only."""
    labels = np.array([s.label for s in train])
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def split_rows(split: SplitData) -> list[dict[str, str]]:
    return [
        {"path": s.path, "label": split.classes[s.label], "group": s.group, "split": name}
        for name, part in (("train", split.train), ("val", split.val))
        for s in part
    ]


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

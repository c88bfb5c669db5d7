"""The train/validation split: stratified, patient-grouped, reproducible; weights from train only."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import make_manifest

from anemia_dist.config import DataConfig
from anemia_dist.errors import DataError
from anemia_dist.splits import balanced_class_weights, build_split


def test_split_keeps_patients_whole_stratifies_and_is_reproducible(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 30, "non-anemic": 60}, per_group=3)
    cfg = DataConfig(manifest=str(manifest), val_fraction=0.2)
    first, again, other = build_split(cfg, seed=1), build_split(cfg, seed=1), build_split(cfg, seed=2)
    assert {s.group for s in first.train}.isdisjoint({s.group for s in first.val})
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert [s.path for s in first.val] != [s.path for s in other.val]
    counts = Counter(first.classes[s.label] for s in first.val)
    assert counts["anemic"] == pytest.approx(6, abs=3) and counts["non-anemic"] == pytest.approx(12, abs=3)
    assert len(first.train) + len(first.val) == 90


def test_class_order_is_explicit_and_weights_come_from_the_training_split(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 20, "non-anemic": 40}, per_group=1)
    split = build_split(DataConfig(manifest=str(manifest), classes=["non-anemic", "anemic"]), seed=0)
    assert split.classes == ["non-anemic", "anemic"]
    weights = balanced_class_weights(split.train, 2)
    counts = Counter(s.label for s in split.train)
    n = len(split.train)
    assert weights.tolist() == pytest.approx([n / (2 * counts[0]), n / (2 * counts[1])])


def test_manifest_with_missing_files_is_an_error_listing_them(tmp_path):
    manifest = make_manifest(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "img_001.png").unlink()
    with pytest.raises(DataError, match="img_001.png"):
        build_split(DataConfig(manifest=str(manifest)), seed=0)


def test_too_few_groups_for_the_split_is_an_error_naming_the_remedy(tmp_path):
    manifest = make_manifest(tmp_path, {"a": 4, "b": 20}, per_group=4)
    with pytest.raises(DataError, match="val_fraction"):
        build_split(DataConfig(manifest=str(manifest), val_fraction=0.2), seed=0)

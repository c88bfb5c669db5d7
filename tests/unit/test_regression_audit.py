"""The audit for haemoglobin targets: rows without a measurement, copies measured differently."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from helpers import make_image_folder, write_csv

from anemia_dist.audit import NO_MEASUREMENT, audit_data
from anemia_dist.config import DataConfig
from anemia_dist.errors import DataError
from anemia_dist.splits import build_split, excluded_rows


def sheet(tmp_path: Path, values: list[str]) -> Path:
    """Images img_000.. (distinct pictures), one patient each, measured ``values``."""
    make_image_folder(tmp_path / "images", {"all": len(values)})
    rows = [{"path": f"images/all/img_{i:03d}.png", "hb": hb, "group": f"p{i}"} for i, hb in enumerate(values)]
    return write_csv(tmp_path / "sheet.csv", rows)


def config(manifest: Path, **settings) -> DataConfig:
    return DataConfig(manifest=str(manifest), measure_column="hb", threshold=11.0, folds=2, **settings)


def test_a_row_without_a_measurement_is_a_listed_bad_file_that_stops_training(tmp_path):
    manifest = sheet(tmp_path, ["9.5", "", "12.5", "10", "13", "8", "12", "14"])
    samples, _, report = audit_data(config(manifest))
    assert math.isnan(samples[1].value) and samples[0].value == 9.5 and samples[0].threshold == 11.0
    assert [(Path(c.path).name, c.problem) for c in report.checks if c.problem] == [("img_001.png", NO_MEASUREMENT)]
    assert any(r["kind"] == NO_MEASUREMENT and r["path"].endswith("img_001.png") for r in report.rows())
    assert sum(report.class_counts().values()) == 7  # the unmeasured row has no class
    with pytest.raises(DataError, match="img_001.png"):
        build_split(config(manifest), seed=0)


def test_bad_files_skip_leaves_the_unmeasured_row_out_and_lists_it(tmp_path):
    manifest = sheet(tmp_path, ["9.5", "", "12.5", "10", "13", "8", "12", "14"])
    split = build_split(config(manifest, bad_files="skip"), seed=0)
    assert len(split.train) + len(split.val) == 7
    assert all(not math.isnan(s.value) for s in split.train + split.val)
    assert [(Path(r["path"]).name, r["reason"], r["label"]) for r in excluded_rows(split)] == [
        ("img_001.png", NO_MEASUREMENT, "")
    ]


def test_copies_with_different_measurements_are_reported_with_both_values(tmp_path):
    manifest = sheet(tmp_path, ["9.5", "12.5", "10", "13"])
    images = tmp_path / "images" / "all"
    shutil.copy(images / "img_000.png", images / "copy_a.png")
    shutil.copy(images / "img_001.png", images / "copy_b.png")
    rows = [
        {"path": f"images/all/img_{i:03d}.png", "hb": hb, "group": f"p{i}"}
        for i, hb in enumerate(["9.5", "12.5", "10", "13"])
    ]
    rows += [
        {"path": "images/all/copy_a.png", "hb": "10.7", "group": "p9"},  # same label, another value
        {"path": "images/all/copy_b.png", "hb": "12.5", "group": "p8"},  # same value: no finding
    ]
    _, _, report = audit_data(config(write_csv(manifest, rows)))
    assert report.conflicts == []  # both copies are anemic at 11 g/dL
    (scope, index), *others = report.measure_conflicts()
    assert scope == "exact" and others == []
    found = [r for r in report.rows() if r["kind"] == "conflicting_measures"]
    assert {Path(r["path"]).name for r in found} == {"img_000.png", "copy_a.png"}
    assert "10.7" in found[0]["detail"] and "9.5" in found[0]["detail"]
    (group,) = report.summary()["conflicting_measure_groups"]
    assert sorted(member["measure"] for member in group["members"]) == ["10.7", "9.5"]


def test_an_audit_without_measurements_reports_no_measurement_findings(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    shutil.copy(root / "anemic" / "img_000.png", root / "non-anemic" / "copy.png")
    report = audit_data(DataConfig(root=str(root)))[2]
    assert report.measures == [] and report.measure_conflicts() == []
    assert "measurements" not in report.summary_text()

"""Regression studies without training: the plan carries each image's Hb and threshold into the folds'
manifests; pooling synthetic fold outputs gives the numbers of a direct computation on the
concatenated out-of-fold rows (agreement, thresholds, interval coverage, per-fold MAE mean ± SD)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anemia_dist.config import load_config
from anemia_dist.demo import make_synthetic_dataset
from anemia_dist.regression_metrics import agreement, at_threshold
from anemia_dist.run_dir import (
    FOLDS,
    OOF_PREDICTIONS,
    PREDICTIONS,
    REPORT,
    STUDY_JSON,
    STUDY_PAGE,
    TEST_DATA,
    TEST_JSON,
    TEST_REPORT,
    TRAIN_DATA,
)
from anemia_dist.study import fold_config, fold_dir, plan_study, write_plan
from anemia_dist.study_hb import hb_subgroups
from anemia_dist.study_report import pool_study

HB = ["model.task=regress", "data.measure_column=hb", "data.threshold=12", "data.group_column=group"]
HB += ["data.near_copy_threshold=null", "study.folds=2", "run.name=hb"]


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_regression_plan_carries_each_images_hb_and_threshold_into_the_folds(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "data", patients=16, images_per_patient=2, size=16, seed=0)
    cfg = load_config(None, [*HB, f"data.manifest={manifest}", f"run.output_dir={tmp_path}"])
    plan = plan_study(cfg)
    write_plan(tmp_path / "hb", cfg, plan)
    hb = {str((manifest.parent / r["path"]).resolve()): float(r["hb"]) for r in read(manifest)}
    rows = read(tmp_path / "hb" / FOLDS)
    assert all(float(r["measure"]) == hb[r["path"]] and float(r["threshold"]) == 12 for r in rows)
    assert all((r["label"] == "anemic") == (hb[r["path"]] < 12) for r in rows)
    for name in (TRAIN_DATA, TEST_DATA):
        assert {"measure", "threshold"} <= set(read(fold_dir(tmp_path / "hb", 0) / name)[0])
    fold = fold_config(cfg, plan, tmp_path / "hb", 0)
    assert (fold.data.measure_column, fold.data.threshold_column, fold.data.threshold) == ("measure", "threshold", None)
    classify = load_config(None, [f"data.manifest={manifest}", "data.group_column=group", "study.folds=2"])
    assert "measure" not in plan_study(classify).rows[0]  # negative control: a classification plan is unchanged
    assert fold_config(classify, plan_study(classify), tmp_path / "c", 0).data.measure_column is None


def fake_fold(study_dir: Path, fold: int, rows: list[dict], radius: float) -> None:
    """What evaluate_hb leaves in a fold: test.json (its own numbers) and test_report/predictions.csv."""
    measured, predicted = np.array([r["measured"] for r in rows]), np.array([r["hb"] for r in rows])
    record = {
        "task": "regress",
        "n": len(rows),
        "n_patients": len({r["group"] for r in rows}),
        "agreement": agreement(measured, predicted, [r["group"] for r in rows], 200),
        "interval": {"target": 0.9, "radius": radius, "coverage": 0.9, "mean_width": 2 * radius},
    }
    directory = fold_dir(study_dir, fold)
    (directory / TEST_REPORT).mkdir(parents=True)
    (directory / TEST_JSON).write_text(json.dumps(record))
    columns = ["path", "group", "measured", "threshold", "hb", "hb_low", "hb_high", "anemic"]
    with (directory / TEST_REPORT / PREDICTIONS).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            bounds = (f"{r['hb'] - radius:.3f}", f"{r['hb'] + radius:.3f}") if np.isfinite(radius) else ("", "")
            writer.writerow({**r, "hb_low": bounds[0], "hb_high": bounds[1], "anemic": int(r["hb"] < r["threshold"])})


def synthetic_study(tmp_path: Path) -> tuple[Path, list[dict]]:
    """3 folds of 40 patients x 2 images; fold 2's validation gave no interval (blank bounds)."""
    rng = np.random.default_rng(0)
    study_dir, rows, plan = tmp_path / "hb", [], []
    for fold, radius in enumerate((1.0, 1.5, np.inf)):
        patient_hb = rng.normal(12, 2, 40)
        fold_rows = [
            {
                "path": f"/x/f{fold}p{p}i{i}.png",
                "group": f"f{fold}p{p}",
                "measured": round(float(patient_hb[p] + rng.normal(0, 0.3)), 3),
                "threshold": 12.0 if p % 2 else 11.0,  # a per-row rule
                "hb": round(float(12 + 0.7 * (patient_hb[p] - 12) + rng.normal(0.2 * fold, 0.8)), 3),
            }
            for p in range(40)
            for i in range(2)
        ]
        fake_fold(study_dir, fold, fold_rows, radius)
        rows += fold_rows
        plan += [
            {"path": r["path"], "group": r["group"], "site": "", "unit": r["group"], "fold": fold} for r in fold_rows
        ]
    with (study_dir / FOLDS).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "group", "site", "unit", "fold"])
        writer.writeheader()
        writer.writerows(plan)
    flow = {"files_found": 240, "left_out": {}, "images_used": 240, "split_units": 120, "images_per_fold": [80] * 3}
    (study_dir / "study_plan.json").write_text(json.dumps({"by": "fold", "names": ["a", "b", "c"], "flow": flow}))
    return study_dir, rows


def test_pooled_hb_equals_a_direct_computation_on_the_concatenated_out_of_fold_rows(tmp_path):
    study_dir, rows = synthetic_study(tmp_path)
    cfg = load_config(None, [*HB, "eval.bootstrap=300", "eval.hb_thresholds=[9]"])
    study = pool_study(study_dir, cfg)
    measured, predicted = np.array([r["measured"] for r in rows]), np.array([r["hb"] for r in rows])
    groups = [r["group"] for r in rows]
    direct = agreement(measured, predicted, groups, 300)
    pooled = study["pooled"]
    assert pooled["n"] == 240 and pooled["n_units"] == 120
    for name, entry in direct.items():
        assert pooled["agreement"][name] == pytest.approx(entry, rel=1e-9), name
    assert pooled["agreement"]["mae"]["value"] == pytest.approx(np.abs(predicted - measured).mean())
    row_rule = at_threshold(measured, predicted, np.array([r["threshold"] for r in rows]), groups, 300)
    assert pooled["thresholds"]["row threshold"]["auroc"] == pytest.approx(row_rule["auroc"], rel=1e-9)
    assert pooled["thresholds"]["9 g/dL"]["sensitivity"] == pytest.approx(
        at_threshold(measured, predicted, 9.0, groups, 300)["sensitivity"], rel=1e-9
    )
    with_bounds = rows[:160]  # fold 2 has no interval: left out of the coverage, not counted as missed
    radius = np.repeat([1.0, 1.5], 80)
    inside = np.abs(np.array([r["measured"] - r["hb"] for r in with_bounds])) <= radius + 5e-4
    assert pooled["interval"]["n"] == 160 and pooled["interval"]["coverage"] == pytest.approx(inside.mean(), abs=0.01)
    fold_mae = [np.abs(predicted[k * 80 : (k + 1) * 80] - measured[k * 80 : (k + 1) * 80]).mean() for k in range(3)]
    assert study["across_folds"]["mae"]["mean"] == pytest.approx(np.mean(fold_mae))
    assert study["across_folds"]["mae"]["sd"] == pytest.approx(np.std(fold_mae, ddof=1))
    assert [f["mae"] for f in study["folds"]] == pytest.approx(fold_mae)
    oof = read(study_dir / OOF_PREDICTIONS)
    assert [r["path"] for r in oof] == [r["path"] for r in rows] and {r["fold"] for r in oof} == {"0", "1", "2"}
    assert json.loads((study_dir / STUDY_JSON).read_text())["task"] == "regress"
    page = (study_dir / REPORT / STUDY_PAGE).read_text()
    assert "Lin" in page and "Test folds" in page and "data:image/png;base64" in page
    assert all((study_dir / REPORT / name).is_file() for name in ("bland_altman.png", "hb_scatter.png"))
    images = agreement(measured, predicted, None, 300)["mae"]  # negative control: units do matter
    assert (images["high"] - images["low"]) < (pooled["agreement"]["mae"]["high"] - pooled["agreement"]["mae"]["low"])


def test_hb_subgroups_equal_agreement_on_each_subgroups_rows():
    rng = np.random.default_rng(1)
    measured = rng.normal(12, 2, 60)
    predicted = measured + rng.normal(0, 1, 60) + np.where(np.arange(60) < 30, 0.0, 1.0)  # one sex biased
    units = [f"p{i // 2}" for i in range(60)]
    labels = {"sex": ["F"] * 30 + ["M"] * 29 + [None]}  # the last image is not in the manifest
    table = hb_subgroups(labels, (measured, predicted, {}), units, 200)
    assert [(g["value"], g["n"]) for g in table] == [("F", 30), ("M", 29)]
    direct = agreement(measured[30:59], predicted[30:59], units[30:59], 200)
    assert table[1]["bias"] == pytest.approx(direct["bias"], rel=1e-9)
    assert table[1]["bias"]["value"] - table[0]["bias"]["value"] > 0.5  # the biased subgroup stands out

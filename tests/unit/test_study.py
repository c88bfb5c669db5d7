"""Studies without training: the plan puts every distinct image in exactly one test fold with its
patient and its copies; the fold trains on the other folds only; the pooled intervals match a direct
bootstrap over patients; PPV/NPV at another prevalence; I² across sites."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import make_manifest, write_csv
from sklearn.metrics import roc_auc_score

from anemia_dist import tracking
from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError, DataError
from anemia_dist.run_dir import FOLDS, TEST_DATA, TRAIN_DATA
from anemia_dist.study import fold_config, fold_dir, plan_study, write_plan
from anemia_dist.study_report import heterogeneity, pooled_metrics, prevalence_values


def manifest_with_copies(tmp_path: Path) -> Path:
    """18 patients of 2 images each, plus byte-identical copies of 3 images filed under new patients."""
    manifest = make_manifest(tmp_path / "data", {"anemic": 18, "non-anemic": 18}, per_group=2)
    rows = list(csv.DictReader(manifest.open()))
    for i, row in enumerate(rows):
        row["site"] = f"site{i // 2 % 3}"  # a patient's images at one site
    for i, row in enumerate(rows[:6:2]):
        copy = Path(row["path"]).with_name(f"copy_{i}.png")
        shutil.copy(tmp_path / "data" / row["path"], tmp_path / "data" / copy)
        rows.append({"path": str(copy), "label": row["label"], "group": f"other-{i}", "site": row["site"]})
    return write_csv(manifest, rows)


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_image_is_tested_exactly_once_and_no_patient_or_copy_straddles_folds(tmp_path):
    manifest = manifest_with_copies(tmp_path)
    cfg = load_config(None, [f"data.manifest={manifest}", "data.group_column=group", "study.folds=3", "run.name=s"])
    plan = plan_study(cfg)
    study_dir = tmp_path / "s"
    write_plan(study_dir, cfg, plan)
    rows = read(study_dir / FOLDS)
    assert sorted(r["path"] for r in rows) == sorted({r["path"] for r in rows}) and len(rows) == 39
    folds_of = defaultdict(set)
    for row in rows:
        folds_of[("group", row["group"])].add(row["fold"])
        folds_of[("bytes", Path(row["path"]).read_bytes())].add(row["fold"])
    assert all(len(found) == 1 for found in folds_of.values())
    copies = [r for r in rows if r["group"].startswith("other")]
    originals = {Path(r["path"]).read_bytes(): r["fold"] for r in rows if not r["group"].startswith("other")}
    assert all(originals[Path(c["path"]).read_bytes()] == c["fold"] for c in copies)  # copy with its original
    assert sorted({r["fold"] for r in rows}) == ["0", "1", "2"]
    for fold in range(3):  # a fold trains on the other folds only, and tests on its own
        train, test = read(fold_dir(study_dir, fold) / TRAIN_DATA), read(fold_dir(study_dir, fold) / TEST_DATA)
        assert {r["path"] for r in test} == {r["path"] for r in rows if r["fold"] == str(fold)}
        assert {r["path"] for r in train}.isdisjoint({r["path"] for r in test})
        assert len(train) + len(test) == len(rows)
    again = plan_study(cfg)
    assert again.rows == plan.rows  # reproducible for a seed: reruns and array tasks agree
    other = plan_study(load_config(None, [f"data.manifest={manifest}", "study.folds=3", "train.seed=7"]))
    assert [r["fold"] for r in other.rows] != [r["fold"] for r in plan.rows]  # negative control: the seed matters
    with pytest.raises(DataError, match="planned on other data"):
        write_plan(study_dir, cfg, other)


def test_fold_config_trains_on_the_fold_manifest_and_resumes_its_own_run(tmp_path):
    manifest = manifest_with_copies(tmp_path)
    overrides = [f"data.manifest={manifest}", "data.site_column=site", "study.by=site", "run.name=loso"]
    overrides += [f"run.output_dir={tmp_path}", "tracking.wandb=offline"]
    cfg = load_config(None, overrides)
    plan = plan_study(cfg)
    assert plan.names == ["site0", "site1", "site2"]
    assert all(row["site"] == plan.names[int(row["fold"])] for row in plan.rows)
    fold = fold_config(cfg, plan, tmp_path / "loso", 1)
    assert fold.data.manifest == str(tmp_path / "loso" / "fold-1" / TRAIN_DATA)
    assert (fold.run.name, fold.run.resume, fold.tracking.group) == ("fold-1", "auto", "loso")
    kwargs = tracking.wandb_init_kwargs(fold, None, "offline")
    assert (kwargs["group"], kwargs["name"]) == ("loso", "loso/site1")  # the fold runs share one W&B group
    assert fold.data.site_column is None  # two training sites cannot give 5 site-held-out validation folds
    assert cfg.data.manifest == str(manifest)  # the study's config is untouched


def test_site_study_refuses_copies_filed_under_two_sites_until_duplicates_first(tmp_path):
    manifest = manifest_with_copies(tmp_path)
    rows = read(manifest)
    rows[-1]["site"] = "site2" if rows[-1]["site"] != "site2" else "site1"  # a copy at another hospital
    write_csv(manifest, rows)
    overrides = [f"data.manifest={manifest}", "data.site_column=site", "study.by=site"]
    with pytest.raises(DataError, match="data.duplicates=first"):
        plan_study(load_config(None, overrides))
    plan = plan_study(load_config(None, [*overrides, "data.duplicates=first"]))
    assert plan.flow["left_out"] == {"duplicate_copy": 3} and len(plan.names) == 3


def test_study_settings_are_checked_before_any_work(tmp_path):
    manifest = make_manifest(tmp_path, {"anemic": 4, "non-anemic": 4})
    with pytest.raises(ConfigError, match="data.site_column"):
        plan_study(load_config(None, [f"data.manifest={manifest}", "study.by=site"]))
    with pytest.raises(DataError, match="study.folds=5"):
        plan_study(load_config(None, [f"data.manifest={manifest}", "study.folds=5"]))
    with pytest.raises(ConfigError, match="study.folds"):
        load_config(None, ["study.folds=1"])
    with pytest.raises(ConfigError, match="eval.prevalence"):
        load_config(None, ["eval.prevalence=1.5"])


def direct_bootstrap(truth, decided, units, resamples, seed=1):
    """Draw whole units with replacement, the plain way."""
    rng = np.random.default_rng(seed)
    codes = np.unique(units, return_inverse=True)[1]
    members = [np.flatnonzero(codes == u) for u in range(codes.max() + 1)]
    values = []
    for _ in range(resamples):
        drawn = np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])
        t, d = truth[drawn], decided[drawn]
        values.append((t & d).sum() / t.sum() if t.any() else np.nan)
    values = np.array(values)
    return np.nanpercentile(values, [2.5, 97.5])


def test_pooled_intervals_agree_with_a_direct_bootstrap_over_patients():
    rng = np.random.default_rng(0)
    units = np.repeat([f"p{i}" for i in range(60)], 3)  # 3 images per patient, correlated within
    patient_truth = rng.random(60) < 0.4
    truth = np.repeat(patient_truth, 3)
    score = np.clip(np.repeat(rng.normal(0.5, 0.2, 60), 3) + 0.25 * truth + rng.normal(0, 0.05, 180), 0, 1)
    thresholds = np.repeat([0.55, 0.6, 0.65], 60)  # each fold its own threshold
    decided = score >= thresholds
    result = pooled_metrics(truth, score, decided, list(units), 2000)
    assert result["auroc"] == pytest.approx(roc_auc_score(truth, score))
    assert result["sensitivity"] == pytest.approx((truth & decided).sum() / truth.sum())
    assert result["ci"]["sensitivity"]["method"] == "bootstrap over patients"
    low, high = direct_bootstrap(truth, decided, units, 2000)
    ci = result["ci"]["sensitivity"]
    assert ci["low"] == pytest.approx(low, abs=0.025) and ci["high"] == pytest.approx(high, abs=0.025)
    images = pooled_metrics(truth, score, decided, [str(i) for i in range(180)], 2000)
    width = images["ci"]["sensitivity"]["high"] - images["ci"]["sensitivity"]["low"]
    assert width < (high - low) * 0.8  # negative control: treating images as independent is too narrow


def test_ppv_and_npv_at_another_prevalence_follow_bayes_rule():
    at = prevalence_values(0.9, 0.8, 0.1)
    assert float(at["ppv"]) == pytest.approx(0.09 / (0.09 + 0.18))
    assert float(at["npv"]) == pytest.approx(0.72 / (0.72 + 0.01))
    truth = np.array([True] * 50 + [False] * 50)
    decided = np.array([True] * 45 + [False] * 5 + [True] * 10 + [False] * 40)
    result = pooled_metrics(truth, decided.astype(float), decided, [str(i) for i in range(100)], 500, 0.1)
    assert result["ppv"] == pytest.approx(45 / 55)  # at the data's own prevalence, 0.5
    assert result["at_prevalence"]["ppv"] == pytest.approx(0.09 / (0.09 + 0.18))
    assert result["at_prevalence"]["ci"]["ppv"]["low"] < result["at_prevalence"]["ppv"]


def test_heterogeneity_is_zero_for_agreeing_sites_and_large_for_disagreeing_ones():
    agreeing = heterogeneity([0.80, 0.81, 0.79], [0.70, 0.71, 0.69], [0.90, 0.91, 0.89])
    assert agreeing["i2"] == 0.0
    disagreeing = heterogeneity([0.95, 0.60, 0.80], [0.92, 0.55, 0.76], [0.98, 0.65, 0.84])
    assert disagreeing["i2"] > 0.9
    assert heterogeneity([0.8], [0.7], [0.9])["i2"] is None


def test_cp_anemic_plans_test_every_image_once_with_its_copies_and_one_hospital_per_site_fold(cp_anemic, monkeypatch):
    from anemia_dist import study

    real, done = study.audit_data, {}
    monkeypatch.setattr(study, "audit_data", lambda cfg: done.setdefault(repr(cfg), real(cfg)))
    sheet = f"data.manifest={cp_anemic / 'Anemia_Data_Collection_Sheet.csv'}"
    plan = plan_study(load_config("cp_anemic", [sheet, "study.folds=5"]))
    paths = [row["path"] for row in plan.rows]
    assert len(paths) == len(set(paths)) == plan.flow["images_used"] == plan.flow["files_found"] == 615
    fold_of_bytes = defaultdict(set)
    for row in plan.rows:
        fold_of_bytes[Path(row["path"]).read_bytes()].add(row["fold"])
    assert len(fold_of_bytes) < 615 and all(len(folds) == 1 for folds in fold_of_bytes.values())  # copies together
    assert min(plan.flow["images_per_fold"]) > 90

    sites = plan_study(
        load_config("cp_anemic", [sheet, "study.by=site", "data.site_column=HOSPITAL"] + ["data.duplicates=first"])
    )
    assert len(sites.names) >= 3 and all(row["site"] == sites.names[int(row["fold"])] for row in sites.rows)
    assert sites.flow["left_out"].get("duplicate_copy", 0) > 0 and sites.flow["images_used"] < 615

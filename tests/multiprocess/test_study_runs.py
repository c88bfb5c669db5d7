"""``anemia-dist study`` for real, with a tiny model: a 3-fold study finishes and pools every image once;
a study stopped after one fold continues without retraining it; the test fold cannot reach the fold's
decisions; a leave-one-site-out study runs on 2 ranks; a regression study pools out-of-fold Hb."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, check, launch, make_manifest, run_cli, write_csv, write_image
from wandb_records import read_records, summary

from anemia_dist.demo import make_synthetic_dataset
from anemia_dist.run_dir import BEST, FOLDS, META, METRICS, OOF_PREDICTIONS, REPORT, STUDY_JSON, STUDY_PAGE, TEST_JSON

pytestmark = pytest.mark.multiprocess

FAST = [*TINY, "train.epochs=2", "unfreeze.head_only_epochs=1", "eval.bootstrap=200", "optim.lr=0.003"]
FAST += ["data.val_fraction=0.34"]  # 3 inner folds: the tiny data has few patients


FOLD_TAIL = ["group", "site", "fold"]


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def study(manifest: Path, out: Path, *extra: str, **kwargs):
    args = [*FAST, f"data.manifest={manifest}", f"run.output_dir={out}", "study.folds=3", *extra]
    return run_cli("study", *args, **kwargs)


def test_study_stopped_after_one_fold_continues_with_only_the_missing_folds(tmp_path):
    manifest = make_manifest(tmp_path / "data", {"anemic": 12, "non-anemic": 12}, per_group=2)
    out, name = tmp_path / "runs", "run.name=cv3"
    check(study(manifest, out, name, "study.fold=0"))  # stopped after fold 0, as a SLURM task would leave it
    cv3 = out / "cv3"
    assert (cv3 / "fold-0" / TEST_JSON).is_file() and not (cv3 / "fold-1").joinpath(METRICS).exists()
    assert not (cv3 / STUDY_JSON).exists()
    partial = check(run_cli("study-report", str(cv3)))  # pools whatever folds are done
    assert "1 of 3 folds" in partial.stdout
    assert json.loads((cv3 / STUDY_JSON).read_text())["folds_done"] == 1
    fold0 = (cv3 / "fold-0" / METRICS).read_bytes(), (cv3 / "fold-0" / METRICS).stat().st_mtime_ns
    wandb_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    result = check(study(manifest, out, name, "eval.prevalence=0.2", "tracking.wandb=offline", env=wandb_env))
    assert "fold-0 is done; not trained again" in result.stderr + result.stdout
    assert ((cv3 / "fold-0" / METRICS).read_bytes(), (cv3 / "fold-0" / METRICS).stat().st_mtime_ns) == fold0
    assert all((cv3 / f"fold-{k}" / TEST_JSON).is_file() for k in range(3))

    oof, planned = read(cv3 / OOF_PREDICTIONS), read(cv3 / FOLDS)
    assert list(oof[0]) == ["path", "label", "group", "site", "fold", "probability", "prediction"]
    assert sorted(r["path"] for r in oof) == sorted(r["path"] for r in planned) and len(oof) == 24  # exactly once
    fold_of_group = {}
    for row in oof:
        assert fold_of_group.setdefault(row["group"], row["fold"]) == row["fold"]  # no patient straddles
    pooled = json.loads((cv3 / STUDY_JSON).read_text())
    assert pooled["folds_done"] == 3 and pooled["pooled"]["n"] == 24 and len(pooled["folds"]) == 3
    assert pooled["pooled"]["at_prevalence"]["prevalence"] == 0.2
    for fold in pooled["folds"]:  # each fold's decisions use its own saved threshold
        meta = json.loads((cv3 / f"fold-{fold['fold']}" / BEST / META).read_text())
        assert fold["threshold"] == meta["threshold"]
        rows = [r for r in oof if r["fold"] == str(fold["fold"])]
        assert all((float(r["probability"]) >= meta["threshold"]) == (r["prediction"] == "anemic") for r in rows)
    assert (cv3 / REPORT / STUDY_PAGE).read_text().count("data:image/png;base64") == 5

    runs = {}  # W&B: the folds trained now and the pooled run share the study's group
    for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        records = read_records(path)
        (run,) = [r.run for r in records if r.HasField("run")][:1]
        runs[run.display_name] = (run.run_group, summary(records))
    assert sorted(runs) == ["cv3/fold-1", "cv3/fold-2", "cv3/pooled"]
    assert {group for group, _ in runs.values()} == {"cv3"}
    assert runs["cv3/pooled"][1]["pooled/auroc"] == pytest.approx(pooled["pooled"]["auroc"])

    again = check(study(manifest, out, name))  # a finished study only pools again
    assert "training fold" not in again.stderr + again.stdout


def test_test_fold_images_do_not_reach_the_folds_decisions(tmp_path):
    """Replacing the pixels of fold 0's test images leaves fold 0's validation losses and threshold
    exactly as they were; replacing one training image (the control) changes them."""
    manifest = make_manifest(tmp_path / "data", {"anemic": 12, "non-anemic": 12}, per_group=2)
    check(study(manifest, tmp_path / "a", "run.name=s", "study.fold=0"))
    planned = read(tmp_path / "a" / "s" / FOLDS)

    def decisions(out: Path) -> tuple[list[float], float]:
        rows = [json.loads(line) for line in (out / "s" / "fold-0" / METRICS).read_text().splitlines()]
        return [r["val_loss"] for r in rows], json.loads((out / "s" / "fold-0" / BEST / META).read_text())["threshold"]

    for i, row in enumerate(r for r in planned if r["fold"] == "0"):
        write_image(Path(row["path"]), (30, 200, 30), seed=10_000 + i)  # other pixels, same labels
    check(study(manifest, tmp_path / "b", "run.name=s", "study.fold=0"))
    assert read(tmp_path / "b" / "s" / FOLDS) == planned  # the same plan
    assert decisions(tmp_path / "b") == decisions(tmp_path / "a")

    trained = next(r for r in planned if r["fold"] != "0")
    write_image(Path(trained["path"]), (30, 200, 30), seed=20_000)
    check(study(manifest, tmp_path / "c", "run.name=s", "study.fold=0"))
    assert decisions(tmp_path / "c")[0] != decisions(tmp_path / "a")[0]


def test_site_held_out_study_runs_every_fold_on_two_ranks_and_reports_sites(tmp_path):
    manifest = make_manifest(tmp_path / "data", {"anemic": 12, "non-anemic": 12}, per_group=2)
    rows = read(manifest)
    for i, row in enumerate(rows):
        row["site"], row["sex"] = f"H{i // 2 % 3}", "F" if i // 2 % 2 else "M"
    write_csv(manifest, rows)
    args = [*FAST, f"data.manifest={manifest}", f"run.output_dir={tmp_path}", "run.name=loso", "train.epochs=1"]
    args += ["study.by=site", "data.site_column=site", "study.subgroups=[sex]"]
    check(launch(["-m", "anemia_dist", "study", *args], num_processes=2))
    result = json.loads((tmp_path / "loso" / STUDY_JSON).read_text())
    assert [s["site"] for s in result["sites"]] == ["H0", "H1", "H2"]
    assert sum(s["n"] for s in result["sites"]) == 24 and set(result["heterogeneity"]) >= {"auroc", "sensitivity"}
    assert {(g["value"], g["n"]) for g in result["subgroups"]} == {("F", 12), ("M", 12)}
    assert all(
        r["world_size"] == 2
        for k in range(3)
        for r in map(json.loads, (tmp_path / "loso" / f"fold-{k}" / METRICS).read_text().splitlines())
    )


def test_cp_anemic_study_with_a_tiny_model_pools_every_image_once(cp_anemic, tmp_path):
    sheet = f"data.manifest={cp_anemic / 'Anemia_Data_Collection_Sheet.csv'}"
    args = ["--config", "cp_anemic", sheet, *TINY, "train.epochs=1", "eval.bootstrap=200", "train.batch_size=32"]
    args += [f"run.output_dir={tmp_path}", "run.name=cp3", "study.folds=3", "eval.prevalence=0.2"]
    args += ["study.subgroups=[GENDER, 'Age(Months) < 24']"]
    check(run_cli("study", *args))
    result = json.loads((tmp_path / "cp3" / STUDY_JSON).read_text())
    oof = read(tmp_path / "cp3" / OOF_PREDICTIONS)
    assert result["pooled"]["n"] == len(oof) == len({r["path"] for r in oof}) == 615
    assert result["pooled"]["ci"]["auroc"]["method"] == "bootstrap over patients"  # copies resampled together
    by_subgroup = defaultdict(int)
    for row in result["subgroups"]:
        by_subgroup[row["subgroup"]] += row["n"]
    assert by_subgroup == {"GENDER": 615, "Age(Months) < 24": 615}


def test_regression_study_pools_every_images_out_of_fold_hb(tmp_path):
    """model.task=regress: each fold's test fold is scored as Hb; study.json pools the predicted Hb."""
    manifest = make_synthetic_dataset(tmp_path / "data", patients=16, images_per_patient=2, size=40, seed=0)
    write_csv(manifest, [{**row, "sex": "F" if int(row["group"][-1]) % 2 else "M"} for row in read(manifest)])
    args = [*FAST, "train.epochs=1", f"data.manifest={manifest}", f"run.output_dir={tmp_path}", "run.name=hb2"]
    args += ["model.task=regress", "data.measure_column=hb", "data.threshold=12", "data.group_column=group"]
    args += ["data.near_copy_threshold=null", "study.folds=2", "eval.hb_thresholds=[9]", "study.subgroups=[sex]"]
    result = check(run_cli("study", *args))
    assert "pooled MAE" in result.stdout
    study_dir = tmp_path / "hb2"
    oof = read(study_dir / OOF_PREDICTIONS)
    assert list(oof[0]) == ["path", "measured", "hb", "hb_low", "hb_high", "threshold", "anemic", *FOLD_TAIL]
    assert len(oof) == 32 and len({r["path"] for r in oof}) == 32 and {r["fold"] for r in oof} == {"0", "1"}
    with manifest.open() as handle:
        hb = {str((manifest.parent / r["path"]).resolve()): float(r["hb"]) for r in csv.DictReader(handle)}
    assert all(float(r["measured"]) == pytest.approx(hb[r["path"]]) for r in oof)  # the lab value, not a label
    pooled = json.loads((study_dir / STUDY_JSON).read_text())
    measured, predicted = (np.array([float(r[k]) for r in oof]) for k in ("measured", "hb"))
    assert pooled["task"] == "regress" and pooled["pooled"]["n"] == 32 and len(pooled["folds"]) == 2
    assert pooled["pooled"]["agreement"]["mae"]["value"] == pytest.approx(np.abs(predicted - measured).mean())
    assert set(pooled["pooled"]["thresholds"]) == {"row threshold", "9 g/dL"}
    assert pooled["across_folds"]["mae"]["folds"] == 2
    assert sum(g["n"] for g in pooled["subgroups"]) == 32 and {g["value"] for g in pooled["subgroups"]} == {"F", "M"}
    assert (study_dir / REPORT / STUDY_PAGE).is_file() and (study_dir / REPORT / "bland_altman.png").is_file()

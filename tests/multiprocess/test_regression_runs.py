"""Haemoglobin regression runs (model.task=regress) on generated data whose colour follows a latent
Hb: it learns, 1 and 2 processes validate alike, and a resumed run continues exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, check, launch, run_cli, script

from anemia_dist.demo import make_synthetic_dataset
from anemia_dist.run_dir import BEST, CURVES, REPORT, SPLITS, SUMMARY, VALIDATION, read_metrics

pytestmark = pytest.mark.multiprocess

REGRESS = ["model.task=regress", "data.measure_column=hb", "data.threshold=11", "data.group_column=group"]
DEMO = ["data.near_copy_threshold=null"]
"""As the demo config: its crops differ only in colour and noise, and the near-copy finder would chain them."""


def demo(tmp_path: Path, patients: int) -> Path:
    """The demo's generator: each patient's latent Hb sets the conjunctiva's colour."""
    return make_synthetic_dataset(tmp_path / "data", patients=patients, images_per_patient=2, size=40, seed=0)


def measured(manifest: Path) -> dict[str, float]:
    with manifest.open() as handle:
        return {str((manifest.parent / r["path"]).resolve()): float(r["hb"]) for r in csv.DictReader(handle)}


def split_values(run: Path, manifest: Path) -> dict[str, np.ndarray]:
    hb = measured(manifest)
    with (run / SPLITS).open() as handle:
        rows = list(csv.DictReader(handle))
    return {side: np.array([hb[r["path"]] for r in rows if r["split"] == side]) for side in ("train", "val")}


def test_a_regression_run_predicts_hb_better_than_the_training_mean(tmp_path):
    manifest = demo(tmp_path, 60)
    settings = ["model.hidden=32", "model.dropout=0.1", "optim.lr=1e-3", "unfreeze.head_only_epochs=1"]
    run = tmp_path / "runs" / "hb"
    args = [*TINY, *REGRESS, *DEMO, *settings, f"data.manifest={manifest}", "train.batch_size=8", "train.epochs=6"]
    check(run_cli("train", *args, f"run.output_dir={run.parent}", "run.name=hb"))
    rows = read_metrics(run)
    best = json.loads((run / SUMMARY).read_text())["best_epoch"]
    values = split_values(run, manifest)
    mean_predictor = float(np.abs(values["val"] - values["train"].mean()).mean())
    best_mae = rows[best - 1]["val_mae"]
    assert best_mae < 0.9 * mean_predictor, (best_mae, mean_predictor)
    assert rows[0]["val_mae"] > 0.9 * mean_predictor  # negative control: the untrained head predicts the mean
    assert {"val_mae", "val_rmse", "val_bias", "val_auroc", "val_sensitivity", "val_specificity"} <= set(rows[0])
    meta = json.loads((run / BEST / "meta.json").read_text())
    assert meta["task"] == "regress"
    assert meta["hb_mean"] == pytest.approx(values["train"].mean())
    assert meta["hb_sd"] == pytest.approx(values["train"].std())
    assert (run / CURVES).is_file()
    validation = json.loads((run / REPORT / VALIDATION).read_text())  # the best epoch's report, at the end
    assert validation["agreement"]["mae"]["value"] == pytest.approx(best_mae, rel=1e-6)
    assert (run / REPORT / "bland_altman.png").is_file()
    check_evaluate_and_predict(tmp_path, run, rows[best - 1], manifest)


def check_evaluate_and_predict(tmp_path: Path, run: Path, best_row: dict, manifest: Path) -> None:
    """evaluate on the run's own validation split reproduces the best epoch's numbers; predict writes
    Hb, its interval and the decision at data.threshold."""
    out = tmp_path / "eval.json"
    evaluated = launch(  # 2 processes: the same numbers as the 1-process training's validation
        ["-m", "anemia_dist", "evaluate", "--checkpoint", str(run / BEST), "--data", str(run / SPLITS),
         "--split", "val", "--out", str(out), "--batch-size", "5", "eval.hb_thresholds=[7, 9, 11]",
         "eval.bootstrap=200"],
    )  # fmt: skip
    check(evaluated)
    record = json.loads(out.read_text())
    assert record["agreement"]["mae"]["value"] == pytest.approx(best_row["val_mae"], rel=1e-5)
    assert record["agreement"]["bias"]["value"] == pytest.approx(best_row["val_bias"], rel=1e-5, abs=1e-6)
    assert set(record["thresholds"]) == {"row threshold", "7 g/dL", "9 g/dL", "11 g/dL"}
    assert record["thresholds"]["row threshold"]["auroc"]["value"] == pytest.approx(best_row["val_auroc"])
    for name in ("mae", "rmse", "bias", "loa_low", "loa_high", "pearson_r", "lin_ccc"):
        entry = record["agreement"][name]
        assert entry["low"] <= entry["value"] <= entry["high"], name
    assert 0 <= record["interval"]["coverage"] <= 1 and record["interval"]["mean_width"] > 0
    report = Path(record["report"]).parent
    for name in (
        "report.html",
        "predictions.csv",
        "bland_altman.png",
        "hb_scatter.png",
        "hb_roc.png",
        "hb_intervals.png",
    ):
        assert (report / name).is_file(), name
    images = sorted((manifest.parent / "images").glob("*.png"))[:3]
    predicted = check(run_cli("predict", "--checkpoint", str(run / BEST), *map(str, images)))
    rows = list(csv.DictReader(predicted.stdout.splitlines()))
    assert list(rows[0]) == ["path", "hb", "hb_low", "hb_high", "anemic", "error"]
    for row in rows:
        hb, low, high = float(row["hb"]), float(row["hb_low"]), float(row["hb_high"])
        assert low < hb < high and row["anemic"] == str(int(hb < 11)) and row["error"] == ""


def test_two_rank_validation_loss_and_mae_equal_one_process(tmp_path):
    manifest = demo(tmp_path, 13)  # uneven shards, a padded last batch
    overrides = [*TINY, *REGRESS, *DEMO, f"data.manifest={manifest}", "data.folds=2", "train.batch_size=3"]
    values = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        check(launch([script("val_loss_probe.py"), str(out), "--", *overrides], num_processes=world))
        ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(world)]
        assert len({(r["val_loss"], r["val_mae"], r["n"]) for r in ranks}) == 1, "identical on every rank"
        values[world] = ranks[0]
    assert values[2]["n"] == values[1]["n"]
    assert values[2]["val_loss"] == pytest.approx(values[1]["val_loss"], rel=1e-6)
    assert values[2]["val_mae"] == pytest.approx(values[1]["val_mae"], rel=1e-6)


def test_a_resumed_regression_run_reproduces_the_uninterrupted_run(tmp_path):
    manifest = demo(tmp_path, 16)
    args = [
        *TINY,
        *REGRESS,
        *DEMO,
        f"data.manifest={manifest}",
        "data.folds=2",
        "optim.lr=1e-3",
        "unfreeze.head_only_epochs=1",
    ]

    def train(name: str, *extra: str) -> None:
        check(run_cli("train", *args, f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *extra))

    train("whole", "train.epochs=4")
    train("parted", "train.epochs=2")
    train("parted", "train.epochs=4", "run.resume=auto")
    reference, resumed = read_metrics(tmp_path / "runs" / "whole"), read_metrics(tmp_path / "runs" / "parted")
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in reference] == [1, 2, 3, 4]
    for got, want in zip(resumed[2:], reference[2:], strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_mae", "val_bias"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)
        assert got["lr"] == want["lr"] and got["unfrozen"] == want["unfrozen"]
    assert reference[2]["unfrozen"] == ["layer4"]  # the resumed part unfreezes


def test_cp_anemic_regression_run_end_to_end(tmp_path, cp_anemic):
    """HB_LEVEL as the target on the real data (tiny model, one epoch), then its evaluation."""
    runs, sheet = tmp_path / "runs", cp_anemic / "Anemia_Data_Collection_Sheet.csv"
    args = [*TINY, "model.task=regress", f"data.manifest={sheet}", "train.epochs=1", "train.batch_size=32"]
    trained = check(run_cli("train", "--config", "cp_anemic", *args, f"run.output_dir={runs}", "run.name=cp"))
    assert "with different measurements" in trained.stdout
    run = runs / "cp"
    audit = json.loads((run / "audit.json").read_text())
    assert len(audit["conflicting_measure_groups"]) > 0  # identical photos listed with different Hb
    (row,) = read_metrics(run)
    assert row["val_mae"] > 0 and 0 <= row["val_auroc"] <= 1
    out = tmp_path / "cp.json"
    check(
        run_cli(
            "evaluate", "--checkpoint", str(run / BEST), "--data", str(run / SPLITS), "--split", "val",
            "--out", str(out), "eval.hb_thresholds=[7, 9, 11]", "eval.bootstrap=200",
        )
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert record["n"] == 123 and record["agreement"]["mae"]["value"] == pytest.approx(row["val_mae"], rel=1e-5)
    assert record["thresholds"]["7 g/dL"]["measured_below"]["value"] > 0

"""What training leaves behind for the report: the threshold in meta.json, per-epoch screening
metrics, and the best epoch's validation report, which ``evaluate`` reproduces."""

from __future__ import annotations

import json
import shutil

import pytest
from browser import check_report_renders
from helpers import TINY, check, launch, make_manifest

from anemia_dist.inference import evaluate
from anemia_dist.report import FIGURES
from anemia_dist.run_dir import BEST, META, REPORT, REPORT_PAGE, SPLITS, VALIDATION, read_metrics

pytestmark = pytest.mark.multiprocess


def test_training_saves_the_threshold_logs_screening_metrics_and_writes_the_report(tmp_path):
    """2 ranks; the threshold rule is a target sensitivity, with temperature scaling. The PIL
    pipeline validates with exactly the preprocessing evaluate uses, so their numbers can agree."""
    manifest = make_manifest(tmp_path / "data", {"anemic": 12, "non-anemic": 12}, per_group=2)
    args = [
        "-m",
        "anemia_dist",
        "train",
        *TINY,
        f"data.manifest={manifest}",
        "train.epochs=2",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=r",
        "eval.threshold_rule=sensitivity",
        "eval.target_sensitivity=0.9",
        "eval.calibrate=true",
        "eval.bootstrap=200",
        "data.pipeline=pil",
    ]
    check(launch(args))
    run = tmp_path / "runs" / "r"

    meta = json.loads((run / BEST / META).read_text())
    assert meta["positive_class"] == "anemic" and meta["threshold_rule"] == "sensitivity>=0.9"
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["temperature"] > 0
    # the quality gate's ranges, measured on the training split (24 px noise pictures)
    ranges = meta["quality"]
    assert ranges["min_size"] == 16 and ranges["max_elongation"] == 1.0 and 0 < ranges["images"] < 24
    assert 0 < ranges["brightness"][0] <= ranges["brightness"][1] < 255
    rows = read_metrics(run)
    for row in rows:
        for key in (
            "val_auroc",
            "val_auprc",
            "val_sensitivity",
            "val_specificity",
            "val_ppv",
            "val_npv",
            "val_f1",
            "val_brier",
            "val_ece",
            "val_balanced_accuracy",
            "val_threshold",
        ):
            assert key in row, key
    best_row = next(r for r in rows if r["epoch"] == meta["epoch"])
    assert best_row["val_threshold"] == meta["threshold"]

    validation = json.loads((run / REPORT / VALIDATION).read_text())
    assert validation["sensitivity"] >= 0.9  # the rule, on the data it was chosen on
    assert validation["threshold"] == meta["threshold"] and "ece_uncalibrated" in validation
    for name in ("report.html", *FIGURES):
        assert (run / REPORT / name).is_file(), name
    page = (run / REPORT / REPORT_PAGE).read_text()
    assert "Most confident false negatives" in page and "Most confident false positives" in page
    errors = sorted(p.name for p in (run / REPORT / "errors").glob("*.png"))
    assert page.count('class="case"') == len(errors) <= 16
    if shutil.which("chromium"):  # where installed (CI): the page as a reader sees it
        check_report_renders(
            run / REPORT / REPORT_PAGE, tmp_path / "screenshots" / "validation.png", len(FIGURES) + len(errors)
        )

    # evaluate on the run's validation rows reproduces the saved model's validation numbers
    record = evaluate(
        run / BEST,
        run / SPLITS,
        ["data.num_workers=0", "eval.bootstrap=100"],
        batch_size=4,
        report_dir=tmp_path / "again",
        split="val",
    )
    assert record["n"] == validation["n"]
    for name in ("auroc", "sensitivity", "specificity", "brier", "loss"):
        assert record[name] == pytest.approx(validation[name], abs=1e-5), name

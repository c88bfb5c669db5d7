"""model.task=regress without a network: targets, per-row WHO thresholds, recalibration, meta.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import make_image_folder, write_csv

from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError
from anemia_dist.sources import Sample, load_samples
from anemia_dist.splits import SplitData
from anemia_dist.tasks import ClassifyTask, HbPoint, RegressionResult, RegressTask, make_task

WHO = [
    {"threshold": 11.0, "when": ["age_months < 60"]},
    {"threshold": 12.0, "when": ["sex == F"]},
    {"threshold": 13.0, "when": ["sex == M"]},
]


def regress(*extra: str):
    return load_config(None, ["model.task=regress", "data.measure_column=hb", *extra])


def sample(i: int, hb: float, threshold: float) -> Sample:
    return Sample(f"img{i}.png", 0 if hb < threshold else 1, f"p{i}", value=hb, threshold=threshold)


def test_regress_needs_a_measure_column_and_classify_stays_the_default():
    assert load_config(None, []).model.task == "classify"
    with pytest.raises(ConfigError, match="model.task"):
        load_config(None, ["model.task=regress"])


def test_who_rules_set_each_rows_threshold_and_the_task_decides_per_row(tmp_path):
    make_image_folder(tmp_path / "images", {"all": 4})
    people = [("11.5", "30", "F"), ("11.5", "300", "F"), ("12.5", "300", "M"), ("12.5", "300", "F")]
    rows = [
        {"path": f"images/all/img_{i:03d}.png", "hb": hb, "age_months": age, "sex": sex}
        for i, (hb, age, sex) in enumerate(people)
    ]
    cfg = regress(f"data.manifest={write_csv(tmp_path / 'sheet.csv', rows)}", f"data.threshold_rules={WHO}")
    samples, classes = load_samples(cfg.data)
    assert [s.threshold for s in samples] == [11.0, 12.0, 13.0, 12.0]
    assert [classes[s.label] for s in samples] == ["non-anemic", "anemic", "anemic", "non-anemic"]
    split = SplitData(samples, samples, classes)
    task = make_task(cfg, split)
    train, _ = task.targets(split)
    assert torch.allclose(task.scale.restore(train[:, 1]).float(), torch.tensor([11.0, 12.0, 13.0, 12.0]))
    # predictions 11.8 for every row: anemic exactly where 11.8 < the row's own threshold
    z = task.scale.standardise([11.8] * 4).float()[:, None]
    totals = task.batch_totals(z, train, torch.ones(2))
    decisions_right = (np.array([11.8] * 4) < [11, 12, 13, 12]) == (
        np.array([11.5, 11.5, 12.5, 12.5]) < [11, 12, 13, 12]
    )
    assert totals[2].item() == decisions_right.sum() == 3


def validation(measured: np.ndarray, predicted: np.ndarray, threshold: float = 11.0) -> RegressionResult:
    thresholds = np.full_like(measured, threshold)
    labels = torch.as_tensor((measured >= thresholds).astype(int))
    return RegressionResult(0.0, 0.0, labels, torch.zeros(len(measured), 2), predicted, measured, thresholds)


def test_epoch_metrics_report_errors_and_calibrate_fits_a_linear_recalibration():
    rng = np.random.default_rng(0)
    samples = [sample(i, hb, 11.0) for i, hb in enumerate(rng.normal(11.5, 1.6, 40))]
    measured = np.array([s.value for s in samples])
    predicted = 11.5 + 0.5 * (measured - 11.5) + rng.normal(0, 0.1, 40)  # shrunk towards the mean
    split = SplitData(samples, samples, ["anemic", "non-anemic"])
    plain, columns = RegressTask(regress("data.threshold=11"), split).epoch_metrics(validation(measured, predicted))
    assert columns["mae"] == pytest.approx(np.abs(predicted - measured).mean())
    assert columns["bias"] == pytest.approx((predicted - measured).mean())
    assert (plain.slope, plain.intercept) == (1.0, 0.0) and math.isfinite(plain.radius)
    calibrating = regress("data.threshold=11", "eval.calibrate=true", "eval.hb_thresholds=[7, 9]")
    fitted, _ = RegressTask(calibrating, split).epoch_metrics(validation(measured, predicted))
    assert fitted.slope == pytest.approx(2.0, rel=0.1)  # little noise: least squares stretches by about 1/0.5
    assert np.abs(fitted.calibrated(predicted) - measured).mean() < np.abs(predicted - measured).mean()
    assert fitted.radius < plain.radius  # the recalibrated residuals are smaller
    meta = fitted.to_meta()
    assert meta["task"] == "regress" and meta["threshold"] == 11.0
    again = HbPoint.from_meta(meta)
    assert again.slope == fitted.slope and again.radius == fitted.radius and again.scale == fitted.scale
    assert meta["hb_thresholds"] == [7.0, 9.0] and again.cut_offs == (7.0, 9.0)  # evaluate's default cut-offs


def test_classify_is_untouched_by_the_task_layer():
    cfg = load_config(None, [])
    split = SplitData([Sample("a.png", 0, "a")], [Sample("b.png", 1, "b")], ["anemic", "non-anemic"])
    task = make_task(cfg, split)
    assert type(task) is ClassifyTask and task.outputs() == 2 and task.targets(split) is None


def test_the_validation_report_is_written_also_when_too_few_patients_give_no_interval(tmp_path):
    from anemia_dist.hb_report import write_validation_hb_report

    samples = [sample(i, hb, 11.0) for i, hb in enumerate([9.0, 10.5, 11.5, 12.0, 13.0])]
    point = HbPoint(
        RegressTask(regress("data.threshold=11"), SplitData(samples, samples, ["anemic", "non-anemic"])).scale, "anemic"
    )
    cfg = regress("data.threshold=11", "eval.hb_thresholds=[9]", "eval.bootstrap=100").eval
    page = write_validation_hb_report(tmp_path, samples, np.array([9.5, 10.0, 11.8, 11.9, 12.5]), point, cfg, 3)
    assert page.is_file() and (tmp_path / "hb_intervals.png").is_file()
    record = json.loads((tmp_path / "validation.json").read_text())
    assert record["interval"]["radius"] is None and set(record["thresholds"]) == {"row threshold", "9 g/dL"}
    assert record["agreement"]["mae"]["value"] == pytest.approx(np.mean([0.5, 0.5, 0.3, 0.1, 0.5]))

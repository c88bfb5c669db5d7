"""Metric functions, intervals, threshold rules and temperature scaling (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from anemia_dist.config import EvalConfig, load_config
from anemia_dist.errors import ConfigError
from anemia_dist.metrics import (
    METRICS,
    OperatingPoint,
    Predictions,
    bootstrap_metrics,
    choose_threshold,
    confidence_intervals,
    fit_temperature,
    group_codes,
    metric_table,
    point_metrics,
    positive_index,
    summarize,
)


def two_class_probs(rng: np.random.Generator, labels: np.ndarray, separation: float = 1.0, scale: float = 1.0):
    """Class 0 is the positive class; returns softmax-like (n, 2) probabilities."""
    logit = scale * (rng.normal(0, 1, len(labels)) + separation * (labels == 0))
    p0 = 1 / (1 + np.exp(-logit))
    return np.stack([p0, 1 - p0], axis=1)


@pytest.fixture
def known():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = two_class_probs(rng, labels)
    probs[:6] = np.round(probs[:6], 1)  # ties in the scores
    probs[6:9] = probs[9]
    return labels, probs


def test_point_metrics_match_sklearn(known):
    labels, probs = known
    pred = Predictions.from_probs(labels, probs, positive=0)
    truth, score = labels == 0, probs[:, 0]
    threshold = 0.42
    decision = score >= threshold
    got = point_metrics(pred, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(truth, decision).ravel()
    expected = {
        "loss": skm.log_loss(labels, probs),
        "accuracy": skm.accuracy_score(truth, decision),
        "balanced_accuracy": skm.balanced_accuracy_score(truth, decision),
        "auroc": skm.roc_auc_score(truth, score),
        "auprc": skm.average_precision_score(truth, score),
        "sensitivity": skm.recall_score(truth, decision),
        "specificity": skm.recall_score(~truth, ~decision),
        "ppv": skm.precision_score(truth, decision),
        "npv": skm.precision_score(~truth, ~decision),
        "f1": skm.f1_score(truth, decision),
        "brier": skm.brier_score_loss(truth, score),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)


def test_weighted_metrics_match_sklearn_sample_weight(known):
    """Bootstrap resamples are sample weights; zero weights (undrawn samples) included."""
    labels, probs = known
    pred = Predictions.from_probs(labels, probs, positive=0)
    truth, score = labels == 0, probs[:, 0]
    weights = np.random.default_rng(0).integers(0, 4, (3, len(labels))).astype(float)
    table = metric_table(pred, 0.5, weights)
    for row, w in enumerate(weights):
        assert table["auroc"][row] == pytest.approx(skm.roc_auc_score(truth, score, sample_weight=w), abs=1e-12)
        assert table["auprc"][row] == pytest.approx(
            skm.average_precision_score(truth, score, sample_weight=w), abs=1e-12
        )
        assert table["loss"][row] == pytest.approx(skm.log_loss(labels, probs, sample_weight=w), abs=1e-12)
        assert table["f1"][row] == pytest.approx(skm.f1_score(truth, score >= 0.5, sample_weight=w), abs=1e-12)
        assert table["brier"][row] == pytest.approx(skm.brier_score_loss(truth, score, sample_weight=w), abs=1e-12)


def test_ece_is_the_count_weighted_gap_of_calibration_curve_bins(known):
    labels, probs = known
    pred = Predictions.from_probs(labels, probs, positive=0)
    observed, predicted = calibration_curve(pred.truth, pred.score, n_bins=10)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], pred.score), minlength=10)
    expected = np.sum(counts[counts > 0] * np.abs(observed - predicted)) / len(pred)
    assert point_metrics(pred, 0.5)["ece"] == pytest.approx(expected, abs=1e-12)


def test_undefined_metrics_are_reported_as_none():
    labels = np.zeros(8, dtype=int)  # only the positive class
    probs = np.tile([0.7, 0.3], (8, 1))
    result = summarize(labels, probs, ["anemic", "non-anemic"], OperatingPoint("anemic", 0.5, "fixed"), 100).result
    assert result["auroc"] is None and result["specificity"] is None and result["npv"] is None
    assert result["sensitivity"] == 1.0 and result["ci"]["auroc"]["low"] is None


def test_wilson_intervals_cover_the_true_sensitivity_about_95_percent():
    """50 anemic images, true sensitivity 0.8 (the exact Wilson coverage there is 0.951)."""
    rng = np.random.default_rng(0)
    true_sensitivity, covered, runs = 0.8, 0, 400
    for _ in range(runs):
        truth = np.r_[np.ones(50, bool), np.zeros(30, bool)]
        detected = np.r_[rng.random(50) < true_sensitivity, np.zeros(30, bool)]
        score = np.where(detected, 0.9, 0.1)
        ci = confidence_intervals(Predictions(truth, score, np.zeros(80)), 0.5, 100)["sensitivity"]
        assert ci["method"] == "wilson"
        covered += ci["low"] <= true_sensitivity <= ci["high"]
    assert 0.92 <= covered / runs <= 0.99


def test_bootstrap_auroc_interval_covers_the_true_auroc():
    """Binormal scores: the true AUROC is Phi(d / sqrt(2))."""
    rng = np.random.default_rng(1)
    d, covered, runs = 1.0, 0, 150
    true_auroc = norm.cdf(d / np.sqrt(2))
    for _ in range(runs):
        truth = np.r_[np.ones(60, bool), np.zeros(60, bool)]
        score = norm.cdf(rng.normal(0, 1, 120) + d * truth)
        ci = confidence_intervals(Predictions(truth, score, np.zeros(120)), 0.5, 300)["auroc"]
        covered += ci["low"] <= true_auroc <= ci["high"]
    assert 0.88 <= covered / runs <= 0.99


def test_patient_bootstrap_keeps_coverage_when_patients_have_several_images():
    """Four identical images per patient: image-level intervals are far too narrow, patient-level are not."""
    rng = np.random.default_rng(2)
    true_accuracy, copies, patients, runs = 0.75, 4, 40, 200
    covered = {"patients": 0, "images": 0}
    for _ in range(runs):
        correct = np.repeat(rng.random(patients) < true_accuracy, copies)
        truth = np.repeat(rng.random(patients) < 0.5, copies)
        score = np.where(correct == truth, 0.9, 0.1)
        groups = np.repeat([f"p{i}" for i in range(patients)], copies)
        for name, group in (("patients", groups), ("images", None)):
            pred = Predictions(truth, score, np.zeros(len(truth)), group_codes(group))
            ci = confidence_intervals(pred, 0.5, 300)["accuracy"]
            covered[name] += ci["low"] <= true_accuracy <= ci["high"]
    assert covered["patients"] / runs >= 0.9
    assert covered["images"] / runs <= 0.8


def test_bootstrap_is_reproducible_and_undefined_resamples_are_skipped():
    truth = np.r_[True, False, False, False, False, False]
    pred = Predictions(truth, np.linspace(0.9, 0.1, 6), np.zeros(6))
    a, b = bootstrap_metrics(pred, 0.5, 200), bootstrap_metrics(pred, 0.5, 200)
    assert all(np.array_equal(a[m], b[m], equal_nan=True) for m in METRICS)
    assert np.isnan(a["auroc"]).any()  # resamples without the positive image
    ci = confidence_intervals(pred, 0.5, 200)["auroc"]
    assert ci["low"] == ci["high"] == 1.0


def test_threshold_rules_pick_the_documented_points():
    #            positives ................  negatives ..................
    score = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.85, 0.5, 0.4, 0.3, 0.2])
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    # Calling 0.6 and above positive catches all 5 positives and 1 negative: J = 1 - 0.2 = 0.8, the
    # maximum; the threshold lies halfway to the next lower score, 0.5.
    assert choose_threshold(truth, score, EvalConfig(threshold_rule="youden")) == pytest.approx(0.55)
    # Sensitivity >= 0.6 is first reached at 0.8 (3 of 5): the most specific such cut; next score 0.7.
    assert choose_threshold(
        truth, score, EvalConfig(threshold_rule="sensitivity", target_sensitivity=0.6)
    ) == pytest.approx(0.75)
    assert choose_threshold(
        truth, score, EvalConfig(threshold_rule="sensitivity", target_sensitivity=1.0)
    ) == pytest.approx(0.55)
    assert choose_threshold(truth, score, EvalConfig(threshold_rule="fixed", fixed_threshold=0.3)) == 0.3
    # Everything positive (all scores equal): halfway to 0.
    assert choose_threshold(truth, np.full(10, 0.4), EvalConfig(threshold_rule="youden")) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="both"):
        choose_threshold(np.ones(4, bool), score[:4], EvalConfig())


def test_operating_point_reports_the_rule_and_positive_class_by_name():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 100)
    probs = two_class_probs(rng, labels)
    cfg = EvalConfig(threshold_rule="sensitivity", target_sensitivity=0.9)
    point = OperatingPoint.fit(labels, probs, ["Anemic", "Non-anemic"], cfg)
    assert point.positive_class == "Anemic" and point.threshold_rule == "sensitivity>=0.9"
    assert (
        point_metrics(point.predictions(labels, probs, ["Anemic", "Non-anemic"]), point.threshold)["sensitivity"] >= 0.9
    )
    assert OperatingPoint.from_meta(point.to_meta(), "meta.json") == point


def test_positive_class_matches_case_insensitively_and_a_missing_one_is_a_clear_error():
    assert positive_index(["Anemic", "Non-anemic"], "anemic") == 0
    assert positive_index(["non-anemic", "anemic"], "ANEMIC") == 1
    with pytest.raises(ConfigError, match=r"eval.positive_class: no class named 'anaemic'.*\['Anemic', 'Non-anemic'\]"):
        positive_index(["Anemic", "Non-anemic"], "anaemic")


def test_temperature_scaling_recovers_the_temperature_and_keeps_the_decisions():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.5, 4000)
    labels = (rng.random(4000) >= 1 / (1 + np.exp(-z))).astype(int)  # label 0 with probability sigmoid(z)
    overconfident = 1 / (1 + np.exp(-3 * z))
    probs = np.stack([overconfident, 1 - overconfident], axis=1)
    temperature = fit_temperature(labels, probs)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = Predictions.from_probs(labels, probs, 0)
    after = Predictions.from_probs(labels, probs, 0, temperature)
    assert point_metrics(after, 0.5)["ece"] < point_metrics(before, 0.5)["ece"] / 2
    assert np.array_equal(before.score >= 0.5, after.score >= 0.5)


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="eval.target_sensitivity"):
        load_config(None, ["eval.target_sensitivity=1.5"])
    with pytest.raises(ConfigError, match="eval.threshold_rule"):
        load_config(None, ["eval.threshold_rule=f1"])

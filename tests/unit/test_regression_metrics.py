"""Haemoglobin agreement metrics against direct computations, and split-conformal coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import roc_auc_score

from anemia_dist.regression_metrics import (
    agreement,
    at_threshold,
    conformal_radius,
    fit_recalibration,
    interval_coverage,
)


def pair(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    measured = rng.normal(11.5, 1.6, n)
    return measured, 0.6 * measured + 4.9 + rng.normal(0.3, 0.8, n)


def test_agreement_matches_direct_computation_of_each_statistic():
    measured, predicted = pair()
    result = agreement(measured, predicted, resamples=200)
    d = predicted - measured
    assert result["n"]["value"] == 60
    assert result["mae"]["value"] == pytest.approx(np.abs(d).mean())
    assert result["rmse"]["value"] == pytest.approx(np.sqrt((d**2).mean()))
    assert result["bias"]["value"] == pytest.approx(d.mean())
    assert result["loa_low"]["value"] == pytest.approx(d.mean() - 1.96 * d.std(ddof=1), abs=1e-4)
    assert result["loa_high"]["value"] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1), abs=1e-4)
    assert result["pearson_r"]["value"] == pytest.approx(pearsonr(measured, predicted)[0])
    # Lin (1989): 2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2), 1/n moments
    cov = np.cov(measured, predicted, bias=True)
    lin = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (measured.mean() - predicted.mean()) ** 2)
    assert result["lin_ccc"]["value"] == pytest.approx(lin)
    assert result["lin_ccc"]["value"] < result["pearson_r"]["value"]  # shrunk and biased: concordance pays
    for name in ("mae", "bias", "lin_ccc"):
        assert result[name]["low"] < result[name]["value"] < result[name]["high"]


def test_perfect_predictions_agree_exactly_and_a_constant_has_no_concordance():
    measured, _ = pair()
    perfect = agreement(measured, measured, resamples=100)
    assert perfect["mae"]["value"] == 0 and perfect["lin_ccc"]["value"] == pytest.approx(1)
    constant = agreement(measured, np.full_like(measured, measured.mean()), resamples=100)
    assert constant["lin_ccc"]["value"] == pytest.approx(0)


def test_bootstrap_over_patients_gives_wider_intervals_than_over_images_when_patients_repeat():
    rng = np.random.default_rng(1)
    patient_error = rng.normal(0, 1.0, 30)
    measured = np.repeat(rng.normal(11.5, 1.5, 30), 4)
    predicted = measured + np.repeat(patient_error, 4) + rng.normal(0, 0.1, 120)
    groups = [f"p{i}" for i in np.repeat(np.arange(30), 4)]
    by_patient = agreement(measured, predicted, groups, resamples=500)["bias"]
    by_image = agreement(measured, predicted, None, resamples=500)["bias"]
    assert by_patient["value"] == by_image["value"]
    assert by_patient["high"] - by_patient["low"] > 1.5 * (by_image["high"] - by_image["low"])


def test_threshold_statistics_match_sklearn_and_counts_with_per_row_thresholds():
    measured, predicted = pair(200, seed=2)
    threshold = np.where(np.arange(200) % 2 == 0, 11.0, 12.0)  # e.g. children and women
    result = at_threshold(measured, predicted, threshold, resamples=200)
    truth, decision = measured < threshold, predicted < threshold
    assert result["sensitivity"]["value"] == pytest.approx((truth & decision).sum() / truth.sum())
    assert result["specificity"]["value"] == pytest.approx((~truth & ~decision).sum() / (~truth).sum())
    assert result["auroc"]["value"] == pytest.approx(roc_auc_score(truth, threshold - predicted))
    assert result["measured_below"]["value"] == truth.sum()
    single = at_threshold(measured, predicted, 11.0, resamples=200)
    assert single["auroc"]["value"] == pytest.approx(roc_auc_score(measured < 11, -predicted))


def test_conformal_radius_is_the_finite_sample_quantile_with_one_image_per_patient():
    residuals = np.arange(1.0, 20.0)  # 19 scores: ceil(20 * 0.9) = 18th smallest
    assert conformal_radius(residuals, None, 0.9) == 18.0
    assert conformal_radius(residuals[:5], None, 0.9) == np.inf  # too few to promise 90 %


def simulate(rng: np.random.Generator, patients: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Several photos per patient; errors share a patient effect (so images are not independent)."""
    per = rng.integers(1, 6, patients)
    codes = np.repeat(np.arange(patients), per)
    hb = np.repeat(rng.normal(11.5, 1.6, patients), per)
    predicted = hb + np.repeat(rng.normal(0, 0.9, patients), per) + rng.normal(0, 0.4, len(codes))
    return hb, predicted, [f"p{c}" for c in codes]


def test_grouped_split_conformal_90_percent_intervals_cover_85_to_95_percent_of_new_patients():
    rng = np.random.default_rng(3)
    coverages = []
    for _ in range(20):
        cal_y, cal_p, cal_groups = simulate(rng, 150)
        radius = conformal_radius(cal_y - cal_p, cal_groups, 0.9)
        test_y, test_p, _ = simulate(rng, 300)
        coverages.append(interval_coverage(test_y, test_p - radius, test_p + radius)["coverage"])
    assert 0.85 <= float(np.mean(coverages)) <= 0.95
    assert all(0.8 < c < 0.98 for c in coverages)
    # negative control: a radius from too small a quantile does not reach 85 %
    small = conformal_radius(cal_y - cal_p, cal_groups, 0.7)
    assert interval_coverage(test_y, test_p - small, test_p + small)["coverage"] < 0.85


def test_recalibration_undoes_shrinkage_towards_the_mean():
    rng = np.random.default_rng(4)
    measured = rng.normal(11.5, 1.6, 500)
    predicted = 11.5 + 0.5 * (measured - 11.5) + rng.normal(0, 0.2, 500)
    slope, intercept = fit_recalibration(measured, predicted)
    assert (slope, intercept) == pytest.approx(np.polyfit(predicted, measured, 1))  # least squares
    assert slope == pytest.approx(1.88, rel=0.05)  # 0.5 var / (0.25 var + 0.04), var = 1.6^2
    corrected = slope * predicted + intercept
    low = measured < 9
    assert abs((corrected - measured)[low].mean()) < 0.3 < 1.0 < abs((predicted - measured)[low].mean())
    assert fit_recalibration(measured, np.full(500, 11.0)) == (1.0, 0.0)

"""Agreement between predicted and measured haemoglobin: error, Bland–Altman limits, correlation,
concordance, screening at thresholds, split-conformal intervals and their 95 % bootstrap intervals.

Pure numpy on (measured, predicted) in g/dL: no model, no files. As in :mod:`anemia_dist.metrics`,
every statistic is computed from per-sample weights, so the point estimate (weights 1) and each
bootstrap resample (weights = how often a sample's patient was drawn) share one vectorised code
path. Definitions: bias = mean(predicted − measured); Bland–Altman 95 % limits of agreement =
bias ± 1.96·SD of the differences (SD with n − 1); Pearson r; Lin's concordance correlation
coefficient 2·s_xy / (s_x² + s_y² + (x̄ − ȳ)²) with 1/n moments (Lin 1989).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import BOOTSTRAP_SEED, CONFIDENCE, bootstrap_weights, group_codes, ranking_areas

AGREEMENT = ("mae", "rmse", "bias", "loa_low", "loa_high", "pearson_r", "lin_ccc")
"""Agreement statistics in report order: mean absolute error, root mean squared error, bias, the
Bland–Altman 95 % limits of agreement, Pearson's r, Lin's concordance correlation coefficient."""
AT_THRESHOLD = ("auroc", "sensitivity", "specificity")
"""Screening statistics at a threshold: AUROC of −predicted Hb against measured < threshold, and
sensitivity and specificity of the decision predicted < threshold."""
LOA_Z = 1.959964
"""The normal quantile of the 95 % limits of agreement."""


def _weighted_moments(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    total = weights.sum(axis=1)
    mean_x, mean_y = weights @ x / total, weights @ y / total
    dx, dy = x[None, :] - mean_x[:, None], y[None, :] - mean_y[:, None]
    return {
        "n": total,
        "mean_x": mean_x,
        "mean_y": mean_y,
        "var_x": (weights * dx**2).sum(axis=1) / total,
        "var_y": (weights * dy**2).sum(axis=1) / total,
        "cov": (weights * dx * dy).sum(axis=1) / total,
    }


def agreement_table(measured: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every agreement statistic for each row of ``weights`` (resamples x samples)."""
    error = predicted - measured
    total = weights.sum(axis=1)
    bias = weights @ error / total
    sd = np.sqrt((weights * (error[None, :] - bias[:, None]) ** 2).sum(axis=1) / np.maximum(total - 1, 1e-12))
    m = _weighted_moments(weights, measured, predicted)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = m["cov"] / np.sqrt(m["var_x"] * m["var_y"])
        lin = 2 * m["cov"] / (m["var_x"] + m["var_y"] + (m["mean_x"] - m["mean_y"]) ** 2)
    return {
        "mae": weights @ np.abs(error) / total,
        "rmse": np.sqrt(weights @ error**2 / total),
        "bias": bias,
        "loa_low": bias - LOA_Z * sd,
        "loa_high": bias + LOA_Z * sd,
        "pearson_r": pearson,
        "lin_ccc": lin,
    }


def threshold_table(
    measured: np.ndarray, predicted: np.ndarray, threshold: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """AUROC, sensitivity and specificity of "predicted < threshold" for "measured < threshold"
    (``threshold`` per row: a WHO rule, or one cut-off for all), for each row of ``weights``."""
    truth, decision = measured < threshold, predicted < threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = weights @ (truth & decision) / (weights @ truth)
        specificity = weights @ (~truth & ~decision) / (weights @ ~truth)
    auroc, _ = ranking_areas(truth, threshold - predicted, weights)  # −predicted Hb, per row's threshold
    return {"auroc": auroc, "sensitivity": sensitivity, "specificity": specificity}


def screening_at(measured: Any, predicted: Any, threshold: Any) -> dict[str, float]:
    """The screening metrics of the decision "predicted < threshold" for "measured < threshold"
    (point values, NaN where undefined): a training epoch's ``val_*`` columns."""
    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), y.shape)
    truth, decision = y < t, p < t
    tp, fp = float((truth & decision).sum()), float((~truth & decision).sum())
    tn, fn = float((~truth & ~decision).sum()), float((truth & ~decision).sum())
    auroc, auprc = ranking_areas(truth, t - p, np.ones((1, len(y))))

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "auroc": float(auroc[0]),
        "auprc": float(auprc[0]),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    defined = values[np.isfinite(values)]
    if not len(defined):
        return math.nan, math.nan
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def with_intervals(
    table: Any, n: int, groups: Sequence[str] | None, resamples: int, seed: int = BOOTSTRAP_SEED
) -> dict[str, dict[str, float]]:
    """``table(weights)``'s statistics with 95 % percentile intervals from ``resamples`` bootstrap
    resamples over patients (over images when every image is its own patient)."""
    point = {name: float(value[0]) for name, value in table(np.ones((1, n))).items()}
    weights = bootstrap_weights(np.random.default_rng(seed), n, group_codes(groups), resamples)
    drawn = table(weights)
    return {
        name: {"value": value, **dict(zip(("low", "high"), _interval(drawn[name]), strict=True))}
        for name, value in point.items()
    }


def agreement(
    measured: Any, predicted: Any, groups: Sequence[str] | None = None, resamples: int = 2000
) -> dict[str, dict[str, float]]:
    """n and every :data:`AGREEMENT` statistic with its 95 % interval (bootstrap over patients)."""
    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    result = with_intervals(lambda w: agreement_table(y, p, w), len(y), groups, resamples)
    return {"n": {"value": float(len(y))}, **result}


def at_threshold(
    measured: Any, predicted: Any, threshold: Any, groups: Sequence[str] | None = None, resamples: int = 2000
) -> dict[str, dict[str, float]]:
    """:data:`AT_THRESHOLD` statistics with 95 % intervals, and the counts below the threshold."""
    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), y.shape)
    result = with_intervals(lambda w: threshold_table(y, p, t, w), len(y), groups, resamples)
    return {**result, "measured_below": {"value": float((y < t).sum())}, "n": {"value": float(len(y))}}


# --------------------------------------------------------------------------- per-image intervals


def conformal_radius(residuals: Any, groups: Sequence[str] | None, coverage: float) -> float:
    """Half-width q of split-conformal intervals ŷ ± q covering ``coverage`` of new patients' images.

    Calibration scores are |measured − predicted| on held-out data. Images of one patient are not
    exchangeable with other patients' images, so each patient counts once: its images share a
    weight of 1/(its image count), and q is the weighted quantile at the finite-sample level
    ⌈(G + 1)·coverage⌉ / G over G patients (the pooled-CDF method of Dunn, Wasserman & Ramdas, 2022).
    With one image per patient this is the usual split-conformal quantile.
    """
    scores = np.abs(np.asarray(residuals, dtype=np.float64))
    codes = (
        np.arange(len(scores)) if groups is None else np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    )
    patients = int(codes.max()) + 1
    level = math.ceil((patients + 1) * coverage) / patients
    if level > 1:
        return math.inf
    weights = 1.0 / np.bincount(codes)[codes] / patients
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(scores[order][np.searchsorted(cumulative, level - 1e-12)])


def interval_coverage(measured: Any, low: Any, high: Any) -> dict[str, float]:
    """Share of measurements inside [low, high] and the mean width."""
    y, lo, hi = (np.asarray(v, dtype=np.float64) for v in (measured, low, high))
    return {"coverage": float(((lo <= y) & (y <= hi)).mean()), "mean_width": float((hi - lo).mean())}


# --------------------------------------------------------------------------- recalibration


def fit_recalibration(measured: Any, predicted: Any) -> tuple[float, float]:
    """(slope, intercept) that map a prediction to ``slope·predicted + intercept``: the least-squares
    line of the measurements on the predictions, fitted on validation.

    Regression models shrink their predictions towards the training mean (Suner et al. 2021); this
    line stretches them back as far as their correlation with the measurement supports, and, unlike
    inverting the fit of predictions on measurements, stays bounded when that correlation is weak.
    """
    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(p) < 3 or p.std() < 1e-9:
        return 1.0, 0.0  # nothing to fit a slope on
    slope, intercept = np.polyfit(p, y, 1)
    return float(slope), float(intercept)

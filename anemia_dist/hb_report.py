"""A haemoglobin model's numbers and report on labelled images: agreement, per-threshold screening,
interval coverage (each with 95 % bootstrap intervals over patients), ``predictions.csv``, the
figures and ``report.html``. Training writes it for the best epoch's validation predictions;
``evaluate`` for any labelled data.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import EvalConfig
from .hb_figures import (
    BLAND_ALTMAN,
    HB_INTERVALS,
    HB_ROC,
    HB_SCATTER,
    plot_bland_altman,
    plot_hb_roc,
    plot_hb_scatter,
    plot_intervals,
    write_hb_page,
)
from .metrics import CONFIDENCE, json_ready
from .regression_metrics import agreement, at_threshold, interval_coverage
from .run_dir import PREDICTIONS, VALIDATION
from .sources import Sample
from .tasks import REGRESS, HbPoint

RULE = "row threshold"
"""The name of the per-row threshold (data.threshold/threshold_column/threshold_rules) in reports."""


def named_thresholds(row_thresholds: np.ndarray, cut_offs: Sequence[float]) -> dict[str, np.ndarray]:
    """Each row's own threshold (the data's rule) and every fixed cut-off of eval.hb_thresholds, by name."""
    return {RULE: row_thresholds} | {f"{cut:g} g/dL": np.full(len(row_thresholds), cut) for cut in cut_offs}


def hb_record(
    samples: Sequence[Sample], predicted: np.ndarray, point: HbPoint, cut_offs: Sequence[float], resamples: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Agreement, per-threshold screening and interval coverage, with 95 % intervals (bootstrap over
    patients); also the thresholds used, by name."""
    measured = np.array([s.value for s in samples], dtype=np.float64)
    groups = [s.group for s in samples]
    thresholds = named_thresholds(np.array([s.threshold for s in samples], dtype=np.float64), cut_offs)
    low, high = predicted - point.radius, predicted + point.radius
    record = {
        "task": REGRESS,
        "n": len(samples),
        "n_patients": len(set(groups)),
        "agreement": agreement(measured, predicted, groups, resamples),
        "thresholds": {name: at_threshold(measured, predicted, t, groups, resamples) for name, t in thresholds.items()},
        "interval": {"target": point.interval, "radius": point.radius, **interval_coverage(measured, low, high)},
        "calibration": {"slope": point.slope, "intercept": point.intercept},
        "confidence_level": CONFIDENCE,
        "bootstrap_resamples": resamples,
        "bias_definition": "predicted − measured, g/dL",
    }
    return json_ready(record), thresholds


def write_hb_report(
    directory: Path,
    samples: Sequence[Sample],
    predicted: np.ndarray,
    point: HbPoint,
    record: dict[str, Any],
    thresholds: dict[str, np.ndarray],
) -> Path:
    """predictions.csv, the four figures and report.html in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    measured = np.array([s.value for s in samples], dtype=np.float64)
    with (directory / PREDICTIONS).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "group", "measured", "threshold", "hb", "hb_low", "hb_high", "anemic"])
        for sample, hb in zip(samples, predicted, strict=True):
            bounds = bounds_text(hb, point.radius)
            anemic = int(hb < sample.threshold)
            writer.writerow([sample.path, sample.group, sample.value, sample.threshold, f"{hb:.3f}", *bounds, anemic])
    cut_offs = sorted({float(t) for values in thresholds.values() for t in np.unique(values)})
    plot_bland_altman(measured, predicted, record, directory / BLAND_ALTMAN)
    plot_hb_scatter(measured, predicted, cut_offs, record, directory / HB_SCATTER)
    plot_hb_roc(measured, predicted, thresholds, record, directory / HB_ROC)
    plot_intervals(measured, predicted, point.radius, record, directory / HB_INTERVALS)
    notes = [
        f"Model: {record['checkpoint']}. Scale, recalibration (slope {point.slope:.3f}, intercept "
        f"{point.intercept:.3f}) and the {point.interval:.0%} interval radius {point.radius:.3f} g/dL were fixed "
        "on the validation split during training, not tuned on this data.",
        f"Anemic: predicted Hb < the row's threshold ({RULE}); other rows: fixed cut-offs from eval.hb_thresholds.",
        "Intervals: 95 % percentile bootstrap over patients.",
    ]
    return write_hb_page(directory, f"Haemoglobin evaluation on {Path(record['data']).name}", record, notes)


def bounds_text(hb: float, radius: float) -> tuple[str, str]:
    """The interval hb ± radius as CSV text; blank when validation was too small for the coverage."""
    return (f"{hb - radius:.3f}", f"{hb + radius:.3f}") if math.isfinite(radius) else ("", "")


def write_validation_hb_report(
    directory: Path, samples: Sequence[Sample], predicted: np.ndarray, point: HbPoint, cfg: EvalConfig, epoch: int
) -> Path:
    """The best epoch's report on the validation split (patients merged with their copies), and its
    numbers in ``validation.json``; the interval coverage here is the one the radius was fitted on."""
    units = [dataclasses.replace(s, group=s.unit or s.group) for s in samples]
    calibrated = point.calibrated(predicted)
    record, thresholds = hb_record(units, calibrated, point, cfg.hb_thresholds, cfg.bootstrap)
    record = {"checkpoint": f"the best epoch ({epoch})", "data": "the validation split", **record}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VALIDATION).write_text(json.dumps(record, indent=2) + "\n")
    return write_hb_report(directory, units, calibrated, point, record, thresholds)

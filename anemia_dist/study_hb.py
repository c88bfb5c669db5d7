"""A regression study's pooled numbers and page (``model.task=regress``): the out-of-fold predicted Hb
of every done fold, pooled.

Each image's Hb was predicted by the model of the fold that held it out, recalibrated and given its
conformal interval by that fold's validation split. Pooled over them: MAE, RMSE, bias, Bland–Altman
limits, Pearson r and Lin's concordance, and per threshold (each row's own, and eval.hb_thresholds)
AUROC, sensitivity and specificity, each with a 95 % bootstrap interval over split units (patients
merged with their copies); the empirical coverage of the intervals; each fold's own numbers; and
MAE, bias and concordance per study.subgroups value.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .hb_figures import (
    BLAND_ALTMAN,
    HB_FIGURES,
    HB_ROC,
    HB_SCATTER,
    hb_tables,
    plot_bland_altman,
    plot_hb_roc,
    plot_hb_scatter,
)
from .hb_report import named_thresholds
from .regression_metrics import agreement, at_threshold, interval_coverage
from .report import figure_grid, write_page
from .run_dir import REPORT, STUDY_PAGE

HB_OOF_COLUMNS = ["path", "measured", "hb", "hb_low", "hb_high", "threshold", "anemic", "group", "site", "fold"]
"""The columns of a regression study's ``oof_predictions.csv``."""
HB_ACROSS_FOLDS = ("mae", "rmse", "bias", "lin_ccc")
"""The per-fold agreement statistics summarised as mean ± SD across folds."""
SHOWN = ("mae", "bias", "lin_ccc")
"""The agreement statistics of the subgroup table."""


def _column(rows: Sequence[dict[str, str]], name: str) -> np.ndarray:
    """A numeric column; NaN where blank (no interval when a fold's validation was too small for one)."""
    return np.array([float(row[name]) if row[name] else np.nan for row in rows], dtype=np.float64)


def pooled_hb(
    measured: np.ndarray,
    predicted: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    thresholds: dict[str, np.ndarray],
    units: Sequence[str],
    resamples: int,
) -> dict[str, Any]:
    """Agreement and per-threshold screening with intervals (bootstrap over units), and the coverage of
    the rows' intervals (those that have one)."""
    low, high = bounds
    finite = np.isfinite(low) & np.isfinite(high)
    coverage = interval_coverage(measured[finite], low[finite], high[finite]) if finite.any() else {}
    return {
        "n": len(measured),
        "n_units": len(set(units)),
        "agreement": agreement(measured, predicted, units, resamples),
        "thresholds": {name: at_threshold(measured, predicted, t, units, resamples) for name, t in thresholds.items()},
        "interval": {"n": int(finite.sum()), "coverage": None, "mean_width": None} | coverage,
    }


def hb_fold_row(fold: dict[str, Any]) -> dict[str, Any]:
    """One fold's test numbers: its agreement statistics and its intervals' target, radius and coverage."""
    row = {key: fold[key] for key in ("fold", "name", "n", "n_patients")}
    row |= {name: fold["agreement"][name]["value"] for name in HB_ACROSS_FOLDS}
    row["ci"] = {name: {k: fold["agreement"][name][k] for k in ("low", "high")} for name in HB_ACROSS_FOLDS}
    interval = fold["interval"]
    if interval.get("radius") is None:  # validation too small for the target: no intervals, nothing covered
        interval = {**interval, "coverage": None, "mean_width": None}
    return row | {k: interval.get(k) for k in ("target", "radius", "coverage", "mean_width")}


def hb_study(oof: Sequence[dict[str, str]], folds: Sequence[dict[str, Any]], cut_offs: Sequence[float], resamples: int):
    """The pooled record and the per-fold rows of a regression study; also the arrays its page plots
    (measured, predicted, thresholds by name)."""
    measured, predicted = _column(oof, "measured"), _column(oof, "hb")
    thresholds = named_thresholds(_column(oof, "threshold"), cut_offs)
    units = [row["unit"] for row in oof]
    bounds = (_column(oof, "hb_low"), _column(oof, "hb_high"))
    pooled = pooled_hb(measured, predicted, bounds, thresholds, units, resamples)
    return pooled, [hb_fold_row(f) for f in folds], (measured, predicted, thresholds)


def hb_subgroups(
    labels: dict[str, list[str | None]], arrays: tuple, units: Sequence[str], resamples: int
) -> list[dict[str, Any]]:
    """Per study.subgroups value: n, MAE, bias and Lin's CCC of the pooled predicted Hb, with intervals."""
    measured, predicted, _ = arrays
    table = []
    for spec, values in labels.items():
        for value in sorted({v for v in values if v is not None}):
            keep = np.array([v == value for v in values])
            kept_units = [u for u, k in zip(units, keep, strict=True) if k]
            result = agreement(measured[keep], predicted[keep], kept_units, resamples)
            entry = {"subgroup": spec, "value": value, "n": int(keep.sum())}
            table.append(entry | {name: result[name] for name in ("mae", "bias", "lin_ccc")})
    return table


def _subgroup_table(study: dict[str, Any]) -> str:
    if not study["subgroups"]:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(g['subgroup'])}</td><td>{html.escape(g['value'])}</td><td>{g['n']}</td>"
        + "".join(f"<td>{g[n]['value']:.3f} ({g[n]['low']:.3f} – {g[n]['high']:.3f})</td>" for n in SHOWN)
        + "</tr>"
        for g in study["subgroups"]
    )
    head = "".join(f"<th>{name}</th>" for name in ("subgroup", "value", "n", *SHOWN))
    return f"<h2>Subgroups</h2><table><tr>{head}</tr>{rows}</table>"


def _fold_table(study: dict[str, Any]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("fold", "n", *HB_ACROSS_FOLDS, "interval coverage"))
    rows = ""
    for f in study["folds"]:
        cells = [html.escape(f["name"]), str(f["n"])] + [f"{f[name]:.3f}" for name in HB_ACROSS_FOLDS]
        cells.append("n/a" if f["coverage"] is None else f"{f['coverage']:.1%}")
        rows += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    spread = "".join(
        f"<tr><td>{name}</td><td>{v['mean']:.3f} ± {v['sd']:.3f}</td></tr>" if v["sd"] is not None else ""
        for name, v in study["across_folds"].items()
    )
    return (
        f"<h2>Test folds</h2><table><tr>{head}</tr>{rows}</table>"
        f"<h2>Across folds (mean ± SD)</h2><table><tr><th>metric</th><th>mean ± SD</th></tr>{spread}</table>"
    )


def write_hb_study_page(study_dir: Path, study: dict[str, Any], arrays: tuple) -> Path:
    """The pooled Bland–Altman, scatter and per-threshold ROC figures and ``report/study.html``."""
    measured, predicted, thresholds = arrays
    directory = Path(study_dir) / REPORT
    directory.mkdir(parents=True, exist_ok=True)
    pooled = study["pooled"]
    cut_offs = sorted({float(t) for values in thresholds.values() for t in np.unique(values)})
    plot_bland_altman(measured, predicted, pooled, directory / BLAND_ALTMAN)
    plot_hb_scatter(measured, predicted, cut_offs, pooled, directory / HB_SCATTER)
    plot_hb_roc(measured, predicted, thresholds, pooled, directory / HB_ROC)
    interval = pooled["interval"]
    covered = (
        "none: each fold's validation split was too small for the target coverage"
        if interval["coverage"] is None
        else f"{interval['coverage']:.1%} of {interval['n']} covered, mean width {interval['mean_width']:.3f} g/dL"
    )
    title = f"Study {study['study']}: {study['folds_done']} of {study['folds_planned']} folds, haemoglobin"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{pooled['n']} out-of-fold predictions, {pooled['n_units']} split units (resampled together); "
        f"{study['confidence_level']:.0%} intervals, {study['bootstrap_resamples']} resamples. Each fold's scale, "
        f"recalibration and interval radius came from a validation split of its training folds only.</p>",
        *hb_tables(pooled),
        f"<p>Per-image prediction intervals: {html.escape(covered)}.</p>",
        _fold_table(study),
        _subgroup_table(study),
        figure_grid(directory, (BLAND_ALTMAN, HB_SCATTER, HB_ROC), HB_FIGURES),
    ]
    return write_page(directory / STUDY_PAGE, title, body)

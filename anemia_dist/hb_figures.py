"""The figures and the HTML page of a haemoglobin (``model.task=regress``) evaluation: Bland–Altman,
predicted against measured with the thresholds, per-threshold ROC curves, interval coverage."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from .figures import pyplot
from .regression_metrics import AGREEMENT
from .report import figure_grid, write_page
from .run_dir import REPORT_PAGE

BLAND_ALTMAN = "bland_altman.png"
HB_SCATTER = "hb_scatter.png"
HB_ROC = "hb_roc.png"
HB_INTERVALS = "hb_intervals.png"
HB_FIGURES = {
    BLAND_ALTMAN: "Bland–Altman: difference (predicted − measured) against the mean, bias and 95 % limits",
    HB_SCATTER: "Predicted against measured Hb, the identity line and the thresholds",
    HB_ROC: "ROC per threshold: −predicted Hb against measured Hb below the threshold",
    HB_INTERVALS: "Per-image prediction intervals (split-conformal), sorted by measured Hb",
}
AGREEMENT_LABELS = dict(
    zip(
        AGREEMENT,
        (
            "MAE (g/dL)",
            "RMSE (g/dL)",
            "Bias (g/dL)",
            "Lower limit of agreement",
            "Upper limit of agreement",
            "Pearson r",
            "Lin's concordance (CCC)",
        ),
        strict=True,
    )
)


def plot_bland_altman(measured: np.ndarray, predicted: np.ndarray, result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    axis.scatter((measured + predicted) / 2, predicted - measured, s=12, alpha=0.6)
    for name, style in (("bias", "-"), ("loa_low", "--"), ("loa_high", "--")):
        value = result["agreement"][name]["value"]
        axis.axhline(value, color="tab:red", linestyle=style, label=f"{name.replace('_', ' ')} {value:.2f}")
    axis.set(xlabel="mean of predicted and measured Hb (g/dL)", ylabel="predicted − measured (g/dL)")
    axis.set_title("Bland–Altman")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_hb_scatter(
    measured: np.ndarray, predicted: np.ndarray, cut_offs: Sequence[float], result: dict[str, Any], path: Path
) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5.5), constrained_layout=True)
    axis.scatter(measured, predicted, s=12, alpha=0.6)
    low, high = float(min(measured.min(), predicted.min())) - 0.5, float(max(measured.max(), predicted.max())) + 0.5
    axis.plot([low, high], [low, high], color="grey", label="identity")
    for cut in cut_offs:
        axis.axvline(cut, color="tab:red", linestyle=":", linewidth=1)
        axis.axhline(cut, color="tab:red", linestyle=":", linewidth=1)
    ccc = result["agreement"]["lin_ccc"]["value"]
    axis.set(xlim=(low, high), ylim=(low, high), xlabel="measured Hb (g/dL)", ylabel="predicted Hb (g/dL)")
    axis.set_title(f"Predicted vs measured (CCC {ccc:.2f}); dotted: thresholds")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_hb_roc(
    measured: np.ndarray, predicted: np.ndarray, thresholds: dict[str, np.ndarray], result: dict[str, Any], path: Path
) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5.5), constrained_layout=True)
    for name, threshold in thresholds.items():
        truth = measured < threshold
        if truth.all() or not truth.any():
            continue  # one kind only: no curve
        fpr, tpr, _ = roc_curve(truth, threshold - predicted)
        auroc = result["thresholds"][name]["auroc"]["value"]
        axis.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.2f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    axis.set_title("ROC per threshold")
    axis.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_intervals(measured: np.ndarray, predicted: np.ndarray, radius: float, result: dict[str, Any], path: Path):
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    order = np.argsort(measured, kind="stable")
    x = np.arange(len(order))
    coverage = result["interval"]
    if math.isfinite(radius):
        inside = np.abs(measured - predicted)[order] <= radius
        for covered, colour in ((True, "tab:blue"), (False, "tab:red")):
            chosen = inside == covered
            centre = predicted[order][chosen]
            axis.vlines(x[chosen], centre - radius, centre + radius, colour, alpha=0.5)
        title = (
            f"{coverage['target']:.0%} intervals: coverage {coverage['coverage']:.1%}, mean width "
            f"{coverage['mean_width']:.2f} g/dL (red: missed)"
        )
    else:
        title = f"no {coverage['target']:.0%} intervals: too few validation patients to calibrate them"
    axis.scatter(x, predicted[order], s=8, color="tab:blue", label="predicted", zorder=2)
    axis.scatter(x, measured[order], s=8, color="black", label="measured", zorder=3)
    axis.set(xlabel="images, by measured Hb", ylabel="Hb (g/dL)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cell(entry: dict[str, Any]) -> str:
    value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    shown = "undefined" if value is None else f"{value:.3f}"
    interval = "" if low is None else f"{low:.3f} – {high:.3f}"
    return f"<td>{shown}</td><td>{interval}</td>"


def hb_tables(result: dict[str, Any]) -> list[str]:
    """The agreement table and the per-threshold screening table of an Hb record, as HTML."""
    agreement = "".join(
        f"<tr><td>{label}</td>{_cell(result['agreement'][name])}</tr>" for name, label in AGREEMENT_LABELS.items()
    )
    screening = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{int(entry['measured_below']['value'])}</td>"
        + "".join(_cell(entry[metric]) for metric in ("auroc", "sensitivity", "specificity"))
        + "</tr>"
        for name, entry in result["thresholds"].items()
    )
    header = "<th>95% CI</th>"
    return [
        f"<table><tr><th>agreement</th><th>value</th>{header}</tr>{agreement}</table>",
        "<table><tr><th>threshold</th><th>measured below</th><th>AUROC</th>"
        f"{header}<th>sensitivity</th>{header}<th>specificity</th>{header}</tr>{screening}</table>",
    ]


def write_hb_page(directory: Path, title: str, result: dict[str, Any], notes: Sequence[str]) -> Path:
    """``report.html``: the facts, the agreement and per-threshold tables, the notes and the figures."""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{result['n']} images, {result['n_patients'] or result['n']} patients (resampled together).</p>",
        *hb_tables(result),
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>",
        figure_grid(directory, list(HB_FIGURES), HB_FIGURES),
    ]
    return write_page(directory / REPORT_PAGE, title, body)

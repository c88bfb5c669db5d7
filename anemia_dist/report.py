"""The evaluation report: PNG figures and one self-contained HTML page showing them with the metrics.

The page embeds every figure (base64), so it can be mailed or archived on its own; each figure
also links to its PNG file next to the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from .evaluation import ECE_BINS, Evaluation, OperatingPoint, Predictions, summarize
from .reporting import plot_curves

REPORT_FILE = "report.html"
FIGURES = {
    "curves.png": "Training: loss, accuracy, validation screening metrics and learning rate per epoch",
    "roc.png": "ROC curve with the operating point",
    "precision_recall.png": "Precision-recall curve with the operating point",
    "confusion.png": "Confusion matrix at the operating threshold",
    "reliability.png": "Reliability diagram: predicted probability against observed frequency",
}
METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1",
    "brier": "Brier score",
    "ece": f"ECE ({ECE_BINS} bins)",
    "loss": "Loss (cross-entropy)",
}
OPERATING_COLOUR = "tab:red"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _with_ci(result: dict[str, Any], name: str) -> str:
    value, ci = result[name], result["ci"][name]
    if value is None:
        return "undefined"
    if ci["low"] is None:
        return f"{value:.3f}"
    return f"{value:.3f} (95% CI {ci['low']:.3f}-{ci['high']:.3f})"


def _operating_label(result: dict[str, Any]) -> str:
    return f"threshold {result['threshold']:.3f} ({result['threshold_rule']})"


def _mark_operating_point(axis, x: float, y: float, result: dict[str, Any], values: str) -> None:
    """The saved threshold's point on a curve, labelled with the rule that chose it."""
    axis.plot(x, y, "o", color=OPERATING_COLOUR, markersize=10, label=f"{_operating_label(result)}:\n{values}")


def plot_roc(pred: Predictions, result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.6, 5.4), constrained_layout=True)
    if pred.truth.any() and not pred.truth.all():
        fpr, tpr, _ = roc_curve(pred.truth, pred.score)
        axis.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"model, AUROC {_with_ci(result, 'auroc')}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    if result["sensitivity"] is not None and result["specificity"] is not None:
        _mark_operating_point(
            axis,
            1 - result["specificity"],
            result["sensitivity"],
            result,
            f"sensitivity {result['sensitivity']:.2f}, specificity {result['specificity']:.2f}",
        )
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"ROC: {result['positive_class']} vs {result['negative_class']} (n={result['n']})",
    )
    _save_unit_square(plt, figure, axis, path, legend_loc="lower right")


def _save_unit_square(plt, figure, axis, path: Path, legend_loc: str) -> None:
    """ROC and precision-recall panels share one look: square, gridded, legend in a free corner."""
    axis.set_aspect("equal")
    axis.grid(alpha=0.3)
    axis.legend(loc=legend_loc, fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_precision_recall(pred: Predictions, result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.6, 5.4), constrained_layout=True)
    prevalence = float(pred.truth.mean()) if len(pred) else 0.0
    if pred.truth.any():
        precision, recall, _ = precision_recall_curve(pred.truth, pred.score)
        axis.step(
            recall,
            precision,
            where="post",
            color="tab:blue",
            linewidth=2,
            label=f"model, AUPRC {_with_ci(result, 'auprc')}",
        )
    axis.axhline(prevalence, linestyle="--", color="grey", label=f"chance (prevalence {prevalence:.2f})")
    if result["sensitivity"] is not None and result["ppv"] is not None:
        _mark_operating_point(
            axis,
            result["sensitivity"],
            result["ppv"],
            result,
            f"sensitivity {result['sensitivity']:.2f}, PPV {result['ppv']:.2f}",
        )
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"Precision-recall: {result['positive_class']} (n={result['n']})",
    )
    _save_unit_square(plt, figure, axis, path, legend_loc="lower left")


def plot_confusion(result: dict[str, Any], path: Path) -> None:
    """Counts with the share of each true class; rows are the truth, positive class first."""
    plt = _pyplot()
    cm = result["confusion_matrix"]
    counts = np.array([[cm["true_positive"], cm["false_negative"]], [cm["false_positive"], cm["true_negative"]]])
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = [result["positive_class"], result["negative_class"]]
    figure, axis = plt.subplots(figsize=(5.6, 4.8), constrained_layout=True)
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    cells = (("true positive", "false negative"), ("false positive", "true negative"))
    for row in range(2):
        for col in range(2):
            axis.text(
                col,
                row,
                f"{counts[row, col]}\n{shares[row, col]:.0%} of row\n{cells[row][col]}",
                ha="center",
                va="center",
                fontsize=11,
                color="white" if shares[row, col] > 0.6 else "black",
            )
    axis.set_xticks([0, 1], [f"predicted\n{n}" for n in names])
    axis.set_yticks([0, 1], [f"true {n}\n(n={counts[i].sum()})" for i, n in enumerate(names)])
    axis.set_title(f"Confusion matrix at {_operating_label(result)}", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(
    pred: Predictions, result: dict[str, Any], path: Path, uncalibrated: Predictions | None
) -> None:
    """Observed frequency of the positive class per predicted-probability bin, with the bins' sizes."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    curves = [(pred, "model", "tab:blue", result["ece"])]
    if uncalibrated is not None:
        curves = [(uncalibrated, "before temperature scaling", "tab:orange", result.get("ece_uncalibrated"))] + [
            (pred, f"after (T={result['temperature']:.2f})", "tab:blue", result["ece"])
        ]
    for predictions, name, colour, ece in curves:
        observed, predicted = calibration_curve(predictions.truth, predictions.score, n_bins=ECE_BINS, pos_label=True)
        top.plot(predicted, observed, "o-", color=colour, label=f"{name}, ECE {ece:.3f}")
    top.set(
        ylim=(0, 1),
        ylabel=f"observed fraction {result['positive_class']}",
        title=f"Reliability ({ECE_BINS} equal-width bins)",
    )
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    bottom.hist(
        [pred.score[pred.truth], pred.score[~pred.truth]],
        bins=edges,
        stacked=True,
        color=["tab:red", "tab:grey"],
        label=[result["positive_class"], result["negative_class"]],
    )
    bottom.axvline(result["threshold"], color="black", linestyle=":", label="threshold")
    bottom.set(xlim=(0, 1), xlabel=f"predicted probability of {result['positive_class']}", ylabel="images")
    bottom.legend(fontsize=8, ncol=3, loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _metrics_table(result: dict[str, Any]) -> str:
    rows = []
    for name, label in METRIC_LABELS.items():
        value, ci = result[name], result["ci"][name]
        shown = "undefined" if value is None else f"{value:.3f}"
        interval = "" if ci["low"] is None else f"{ci['low']:.3f} - {ci['high']:.3f}"
        rows.append(f"<tr><td>{label}</td><td>{shown}</td><td>{interval}</td><td>{html.escape(ci['method'])}</td></tr>")
    if result.get("ece_uncalibrated") is not None:
        before = result["ece_uncalibrated"]
        rows.append(f"<tr><td>ECE before temperature scaling</td><td>{before:.3f}</td><td></td><td></td></tr>")
    return "<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>interval</th></tr>" + "".join(rows) + "</table>"


def _figure_html(directory: Path, name: str) -> str:
    encoded = base64.b64encode((directory / name).read_bytes()).decode("ascii")
    caption = html.escape(FIGURES[name])
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{encoded}" alt="{caption}"></a>'
        f'<figcaption>{caption} (<a href="{name}">{name}</a>)</figcaption></figure>'
    )


STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f0f0f0; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
.wide img { max-width: 1180px; }
figcaption { font-size: 0.9em; color: #555; }
"""


def write_html(
    directory: Path, title: str, result: dict[str, Any], notes: Sequence[str], figures: Sequence[str]
) -> Path:
    facts = [
        f"{result['n']} images, {result['n_positive']} {html.escape(result['positive_class'])}",
        f"{result['n_patients']} patients (groups resampled together)"
        if result["n_patients"]
        else "no patient column: images treated as independent",
        f"positive class: {html.escape(result['positive_class'])}",
        f"operating threshold: P({html.escape(result['positive_class'])}) &ge; {result['threshold']:.4f} "
        f"(rule: {html.escape(result['threshold_rule'])})",
        f"temperature: {result['temperature']:.3f}",
    ]
    wide = [name for name in figures if name == "curves.png"]
    small = [name for name in figures if name not in wide]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>",
        _metrics_table(result),
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>",
        '<h2>Figures</h2><div class="figures">' + "".join(_figure_html(directory, n) for n in small) + "</div>",
        *(f'<div class="wide">{_figure_html(directory, n)}</div>' for n in wide),
    ]
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path = directory / REPORT_FILE
    path.write_text(page)
    return path


def standard_notes(result: dict[str, Any]) -> list[str]:
    """What a reader must know to read the numbers correctly."""
    notes = [
        f"Intervals: {result['confidence_level']:.0%}; Wilson for proportions of independent images, otherwise a "
        f"percentile bootstrap with {result['bootstrap_resamples']} resamples"
        + (" drawing whole patients." if result["n_patients"] else " drawing images."),
        f"Loss: {result['loss_definition']}.",
        f"ECE: expected calibration error of P({result['positive_class']}) over {ECE_BINS} equal-width bins.",
    ]
    if not result["n_patients"]:
        notes.append(
            "No patient (group) column: if a patient has several images, or the data holds duplicate images, these "
            "intervals are too narrow. Evaluate from a CSV with a group column to resample patients."
        )
    return notes


def write_report(
    directory: Path,
    title: str,
    evaluation: Evaluation,
    notes: Sequence[str] = (),
    rows: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """All figures plus ``report.html`` in ``directory``; ``rows`` (metrics.jsonl) adds the training curves."""
    result, pred = evaluation.result, evaluation.pred
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = []
    if rows:
        plot_curves(rows, directory / "curves.png")
        figures.append("curves.png")
    plot_roc(pred, result, directory / "roc.png")
    plot_precision_recall(pred, result, directory / "precision_recall.png")
    plot_confusion(result, directory / "confusion.png")
    plot_reliability(pred, result, directory / "reliability.png", evaluation.uncalibrated)
    figures += ["roc.png", "precision_recall.png", "confusion.png", "reliability.png"]
    return write_html(directory, title, result, [*notes, *standard_notes(result)], figures)


def write_validation_report(
    directory: Path,
    labels: Any,
    probs: Any,
    groups: Sequence[str],
    classes: Sequence[str],
    point: OperatingPoint,
    resamples: int,
    epoch: int,
    rows: Sequence[dict[str, Any]],
) -> Path:
    """The end-of-training report: the best epoch's validation predictions at the saved operating point."""
    evaluation = summarize(labels, probs, classes, point, resamples, groups)
    notes = [
        f"Validation split of this run, best epoch {epoch} (lowest validation loss).",
        "The threshold was chosen on these same images, so the metrics that depend on it (sensitivity, "
        "specificity, PPV, NPV, accuracy, F1) are optimistic here. Judge the model with `anemia-dist evaluate` "
        "on patients it never saw.",
    ]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "validation.json").write_text(json.dumps(evaluation.result, indent=2) + "\n")
    return write_report(directory, f"Validation report, best epoch {epoch}", evaluation, notes, rows)

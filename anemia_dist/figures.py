"""Every figure a run or an evaluation draws, as PNG files: the training curves, and the ROC,
precision-recall, confusion and reliability plots at the operating point.

matplotlib is set up once (:func:`pyplot`, the non-interactive Agg backend, imported on first
use: training pays nothing for it until the end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from .metrics import ECE_BINS, Predictions
from .run_dir import unfreeze_epochs

OPERATING_COLOUR = "tab:red"


@cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lr_cut_epochs(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Epochs that started with a lower learning rate than the one before."""
    return [b["epoch"] for a, b in pairwise(rows) if b["lr"][0] < a["lr"][0]]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy, validation screening metrics (when logged) and learning rate per epoch,
    with unfreezing and lr cuts marked."""
    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    screening = "val_auroc" in rows[0]
    figure, axes = plt.subplots(
        1, 4 if screening else 3, figsize=(20 if screening else 15, 4.2), constrained_layout=True
    )
    panels = (
        ("Loss (class-weighted CE)", "train_loss", "val_loss"),
        ("Accuracy", "train_acc", "val_acc"),
    )
    if "val_mae" in rows[0]:  # model.task=regress
        panels = (("Loss (Huber, SD units)", "train_loss", "val_loss"), ("Mean absolute error (g/dL)", None, "val_mae"))
    for axis, (title, train_key, val_key) in zip(axes, panels, strict=False):
        if train_key is not None:
            axis.plot(epochs, [r[train_key] for r in rows], "o-", label="train")
        axis.plot(epochs, [r[val_key] for r in rows], "s-", label="validation")
        axis.set_title(title)
    best = min(rows, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
    axes[0].plot([best["epoch"]], [best["val_loss"]], "*", color="gold", markersize=16, label="best")
    if screening:
        for key, name in (
            ("val_auroc", "AUROC"),
            ("val_sensitivity", "sensitivity"),
            ("val_specificity", "specificity"),
        ):
            axes[2].plot(epochs, [r[key] for r in rows], "o-", label=name)
        threshold = "the row thresholds" if "val_mae" in rows[0] else "each epoch's own threshold"
        axes[2].set(title=f"Validation screening ({threshold})", ylim=(0, 1.02))
    lr_axis = axes[-1]
    for index, name in enumerate(rows[0].get("lr_groups", ["lr"])):
        lr_axis.plot(epochs, [r["lr"][index] for r in rows], "o-", label=name)
    lr_axis.set_yscale("log")
    lr_axis.set_title("Learning rate")
    for axis in axes:
        for epoch in unfreeze_epochs(rows):
            axis.axvline(epoch - 0.5, color="tab:green", linestyle="--", label="unfreeze")
        for epoch in lr_cut_epochs(rows):
            axis.axvline(epoch - 0.5, color="tab:red", linestyle=":", label="lr cut")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axis.legend(unique.values(), unique.keys(), fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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


def plot_reliability(pred: Predictions, result: dict[str, Any], path: Path, uncalibrated: Predictions | None) -> None:
    """Observed frequency of the positive class per predicted-probability bin, with the bins' sizes."""
    plt = pyplot()
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

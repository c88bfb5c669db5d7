"""The evaluation report: one self-contained HTML page with the facts, the metrics table, the notes
a reader needs, and every figure (:mod:`anemia_dist.figures`).

The page embeds every figure (base64), so it can be mailed or archived on its own; each figure
also links to its PNG file next to the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .figures import plot_confusion, plot_curves, plot_precision_recall, plot_reliability, plot_roc
from .metrics import ECE_BINS, Evaluation, OperatingPoint, Predictions, summarize
from .run_dir import CONFUSION, CURVES, PRECISION_RECALL, RELIABILITY, REPORT_PAGE, ROC, VALIDATION

FIGURES = {
    CURVES: "Training: loss, accuracy, validation screening metrics and learning rate per epoch",
    ROC: "ROC curve with the operating point",
    PRECISION_RECALL: "Precision-recall curve with the operating point",
    CONFUSION: "Confusion matrix at the operating threshold",
    RELIABILITY: "Reliability diagram: predicted probability against observed frequency",
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


def figure_html(directory: Path, name: str, caption: str) -> str:
    """The PNG ``directory/name`` embedded (the page stands alone), linked to its file, captioned."""
    encoded = base64.b64encode((directory / name).read_bytes()).decode("ascii")
    caption = html.escape(caption)
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{encoded}" alt="{caption}"></a>'
        f'<figcaption>{caption} (<a href="{name}">{name}</a>)</figcaption></figure>'
    )


def figure_grid(directory: Path, names: Sequence[str], captions: dict[str, str]) -> str:
    """The "Figures" section: each named PNG as :func:`figure_html`, side by side."""
    return (
        '<h2>Figures</h2><div class="figures">'
        + "".join(figure_html(directory, n, captions[n]) for n in names)
        + "</div>"
    )


def write_page(path: Path, title: str, body: Sequence[str]) -> Path:
    """One self-contained HTML page (the house style inline, no request leaves it) at ``path``."""
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path.write_text(page)
    return path


@dataclass
class Gallery:
    """A report section of pictures (e.g. the most confident false negatives with their heat-maps)."""

    title: str
    note: str
    pictures: list[tuple[str, str]] = field(default_factory=list)
    """(PNG path relative to the report folder, caption)."""


Explainer = Callable[[Predictions], Sequence[Gallery]]
"""Draws the galleries of a report from its per-image predictions (:func:`anemia_dist.inference.error_explainer`)."""


def _gallery_html(directory: Path, gallery: Gallery) -> str:
    items = []
    for name, caption in gallery.pictures:
        encoded = base64.b64encode((directory / name).read_bytes()).decode("ascii")
        text = html.escape(caption)
        items.append(
            f'<figure class="case"><a href="{html.escape(name)}"><img src="data:image/png;base64,{encoded}" '
            f'alt="{text}"></a><figcaption>{text}</figcaption></figure>'
        )
    shown = '<div class="figures">' + "".join(items) + "</div>" if items else "<p>None.</p>"
    return f"<h2>{html.escape(gallery.title)}</h2><p>{html.escape(gallery.note)}</p>{shown}"


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
.case img { width: 256px; height: auto; max-height: 384px; object-fit: contain; }
.case figcaption { max-width: 256px; word-break: break-all; }
"""


def write_html(
    directory: Path,
    title: str,
    result: dict[str, Any],
    notes: Sequence[str],
    figures: Sequence[str],
    galleries: Sequence[Gallery] = (),
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
    wide = [name for name in figures if name == CURVES]
    small = [name for name in figures if name not in wide]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>",
        _metrics_table(result),
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>",
        '<h2>Figures</h2><div class="figures">'
        + "".join(figure_html(directory, n, FIGURES[n]) for n in small)
        + "</div>",
        *(f'<div class="wide">{figure_html(directory, n, FIGURES[n])}</div>' for n in wide),
        *(_gallery_html(directory, gallery) for gallery in galleries),
    ]
    return write_page(directory / REPORT_PAGE, title, body)


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
    explain: Explainer | None = None,
) -> Path:
    """All figures plus ``report.html`` in ``directory``; ``rows`` (metrics.jsonl) adds the training
    curves, ``explain`` the galleries it draws (the most confident errors with their heat-maps)."""
    result, pred = evaluation.result, evaluation.pred
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = []
    if rows:
        plot_curves(rows, directory / CURVES)
        figures.append(CURVES)
    plot_roc(pred, result, directory / ROC)
    plot_precision_recall(pred, result, directory / PRECISION_RECALL)
    plot_confusion(result, directory / CONFUSION)
    plot_reliability(pred, result, directory / RELIABILITY, evaluation.uncalibrated)
    figures += [ROC, PRECISION_RECALL, CONFUSION, RELIABILITY]
    galleries = explain(pred) if explain is not None else ()
    return write_html(directory, title, result, [*notes, *standard_notes(result)], figures, galleries)


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
    explain: Explainer | None = None,
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
    (directory / VALIDATION).write_text(json.dumps(evaluation.result, indent=2) + "\n")
    return write_report(directory, f"Validation report, best epoch {epoch}", evaluation, notes, rows, explain)

"""A study's page, ``report/study.html``: one self-contained file with the pooled curves (each fold's
faint behind), the forest plot, the pooled confusion matrix and reliability diagram, the per-fold,
per-site and subgroup tables, and the flow of counts. Figures come from :mod:`anemia_dist.figures`
where they exist; the page is built like :mod:`anemia_dist.report`'s.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from .figures import plot_confusion, plot_reliability, pyplot
from .metrics import Predictions
from .report import figure_grid, figure_html, write_page
from .run_dir import CONFUSION, FOREST, PRECISION_RECALL, RELIABILITY, REPORT, ROC, STUDY_PAGE

SHOWN = ("auroc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc", "brier", "ece")
CAPTIONS = {
    ROC: "Pooled out-of-fold ROC curve; each fold's curve faint behind",
    PRECISION_RECALL: "Pooled out-of-fold precision-recall curve; each fold's curve faint behind",
    FOREST: "Per-fold test AUROC, sensitivity and specificity with 95% intervals; the pooled value in black",
    CONFUSION: "Pooled confusion matrix, each image decided at its own fold's threshold",
    RELIABILITY: "Pooled reliability diagram of the out-of-fold probabilities",
}


def _fold_masks(oof: Sequence[dict[str, str]]) -> list[tuple[str, np.ndarray]]:
    folds = [row["fold"] for row in oof]
    return [(f"fold {k}", np.array([f == k for f in folds])) for k in sorted(set(folds), key=int)]


def plot_pooled_curves(oof, truth: np.ndarray, score: np.ndarray, study: dict[str, Any], directory: Path) -> None:
    """ROC and precision-recall of the pooled predictions, with every fold's curve in a faint line."""
    plt = pyplot()
    pooled = study["pooled"]
    for name, curve, labels in (
        (ROC, lambda t, s: roc_curve(t, s)[:2], ("1 - specificity", "sensitivity")),
        (PRECISION_RECALL, lambda t, s: precision_recall_curve(t, s)[1::-1], ("recall", "precision")),
    ):
        figure, axis = plt.subplots(figsize=(5.6, 5.4), constrained_layout=True)
        for _, mask in _fold_masks(oof):
            if truth[mask].any() and not truth[mask].all():
                x, y = curve(truth[mask], score[mask])
                axis.plot(x, y, color="tab:blue", alpha=0.25, linewidth=1)
        if truth.any() and not truth.all():
            x, y = curve(truth, score)
            metric = "auroc" if name == ROC else "auprc"
            value = pooled[metric]
            axis.plot(x, y, color="tab:blue", linewidth=2.2, label=f"pooled, {metric.upper()} {value:.3f}")
        if name == ROC:
            axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
        axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=labels[0], ylabel=labels[1])
        axis.set_title(f"{'ROC' if name == ROC else 'Precision-recall'}, {study['folds_done']} folds (n={pooled['n']})")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right" if name == ROC else "lower left", fontsize=8)
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)


def plot_forest(study: dict[str, Any], path: Path) -> None:
    """One panel per metric: each fold (or site) with its interval, and the pooled estimate."""
    plt = pyplot()
    folds = study["folds"]
    metrics = ("auroc", "sensitivity", "specificity")
    figure, axes = plt.subplots(1, 3, figsize=(11, 1.2 + 0.45 * (len(folds) + 1)), sharey=True, constrained_layout=True)
    labels = [f["name"] for f in folds] + ["pooled"]
    for axis, metric in zip(axes, metrics, strict=True):
        rows = [(f[metric], f["ci"][metric]) for f in folds] + [
            (study["pooled"][metric], study["pooled"]["ci"][metric])
        ]
        for y, (value, ci) in enumerate(rows):
            if value is None:
                continue
            colour = "black" if y == len(folds) else "tab:blue"
            if ci["low"] is not None:
                axis.plot([ci["low"], ci["high"]], [y, y], color=colour)
            axis.plot(value, y, "D" if y == len(folds) else "s", color=colour)
        axis.set(xlim=(-0.02, 1.02), title=metric)
        axis.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ci(entry: dict[str, Any], name: str) -> str:
    value, ci = entry.get(name), entry.get("ci", {}).get(name)
    if value is None:
        return "undefined"
    interval = f" ({ci['low']:.3f}-{ci['high']:.3f})" if ci and ci.get("low") is not None else ""
    return f"{value:.3f}{interval}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sections(study: dict[str, Any]) -> list[str]:
    pooled, flow = study["pooled"], study["flow"]
    left_out = ", ".join(f"{reason} {n}" for reason, n in flow["left_out"].items()) or "none"
    counts = [
        ("files found", flow["files_found"]),
        ("left out by the audit and data.duplicates", f"{sum(flow['left_out'].values())} ({left_out})"),
        ("images used", flow["images_used"]),
        ("split units (patients merged with their copies)", flow["split_units"]),
        ("images per test fold", ", ".join(map(str, flow["images_per_fold"]))),
    ]
    sections = [
        "<h2>Flow of counts</h2>" + _table(["step", "count"], counts),
        "<h2>Pooled out-of-fold metrics</h2>"
        + _table(["metric", "value (95% CI)"], [(m, _ci(pooled, m)) for m in SHOWN]),
    ]
    if "at_prevalence" in pooled:
        at = pooled["at_prevalence"]
        sections.append(
            f"<p>At a prevalence of {at['prevalence']:.0%}: PPV {_ci(at, 'ppv')}, NPV {_ci(at, 'npv')}.</p>"
        )
    across = study["across_folds"]
    spread = [(m, f"{v['mean']:.3f} ± {v['sd']:.3f}" if v["sd"] is not None else "one fold") for m, v in across.items()]
    sections.append("<h2>Across folds (mean ± SD)</h2>" + _table(["metric", "mean ± SD"], spread))
    fold_rows = [(f["name"], f["n"], f"{f['threshold']:.4f}", *(_ci(f, m) for m in SHOWN[:3])) for f in study["folds"]]
    sections.append(
        "<h2>Test folds</h2>" + _table(["fold", "n", "threshold", "AUROC", "sensitivity", "specificity"], fold_rows)
    )
    if "heterogeneity" in study:
        het = [
            (m, "n/a" if h["i2"] is None else f"{h['i2']:.0%} (Q {h['q']:.2f})")
            for m, h in study["heterogeneity"].items()
        ]
        sections.append("<h2>Heterogeneity across sites</h2>" + _table(["metric", "I²"], het))
    if study["subgroups"]:
        rows = [
            (g["subgroup"], g["value"], g["n"], g["n_positive"], _ci(g, "sensitivity"), _ci(g, "specificity"))
            for g in study["subgroups"]
        ]
        sections.append(
            "<h2>Subgroups</h2>" + _table(["subgroup", "value", "n", "positive", "sensitivity", "specificity"], rows)
        )
    return sections


def write_study_page(study_dir: Path, study: dict[str, Any], oof, truth: np.ndarray, score: np.ndarray) -> Path:
    """The figures and ``report/study.html`` in the study directory; returns the page."""
    directory = Path(study_dir) / REPORT
    directory.mkdir(parents=True, exist_ok=True)
    pooled = study["pooled"]
    result = {
        **pooled,
        "positive_class": study["positive_class"],
        "negative_class": next((c for c in study["classes"] if c != study["positive_class"]), "other"),
        "threshold": float(np.mean([f["threshold"] for f in study["folds"]])),
        "threshold_rule": "each fold's own threshold",
        "temperature": 1.0,
    }
    plot_pooled_curves(oof, truth, score, study, directory)
    plot_forest(study, directory / FOREST)
    plot_confusion(result, directory / CONFUSION)
    plot_reliability(Predictions(truth, score, np.zeros(len(truth))), result, directory / RELIABILITY, None)
    title = f"Study {study['study']}: {study['folds_done']} of {study['folds_planned']} folds ({study['by']})"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(study['interval_method'])}; {study['confidence_level']:.0%} intervals, "
        f"{study['bootstrap_resamples']} resamples. Each fold's threshold, temperature, early stopping and "
        f"scheduler used a validation split of its training folds only; its test fold was seen once, here.</p>",
        *_sections(study),
        figure_grid(directory, (ROC, PRECISION_RECALL, CONFUSION, RELIABILITY), CAPTIONS),
        f'<div class="wide">{figure_html(directory, FOREST, CAPTIONS[FOREST])}</div>',
    ]
    return write_page(directory / STUDY_PAGE, title, body)

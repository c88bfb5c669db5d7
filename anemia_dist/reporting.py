"""The run directory: resolved config, splits, per-epoch metrics, summary and curves.

Only the main process constructs a :class:`RunDirectory` that writes; the others get one whose
methods do nothing, so the loop never branches on the rank.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
PREEMPTED_FILE = "preempted.json"


class RunDirectory:
    def __init__(self, path: Path, writes: bool):
        self.path = Path(path)
        self.writes = writes
        if writes:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        if self.writes:
            (self.path / name).write_text(text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def write_csv(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        if self.writes and rows:
            with (self.path / name).open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    def has_metrics(self) -> bool:
        return (self.path / METRICS_FILE).is_file()

    def remove(self, name: str) -> None:
        if self.writes:
            (self.path / name).unlink(missing_ok=True)

    def keep_metrics_through(self, epoch: int) -> list[dict[str, Any]]:
        """On resume: drop rows of epochs after the checkpoint (they will be run again)."""
        if not self.writes:
            return []
        rows = [row for row in read_metrics(self.path) if row["epoch"] <= epoch]
        self.write_text(METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        if self.writes:
            with (self.path / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def plot_curves(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.writes and rows:
            plot_curves(rows, self.path / CURVES_FILE)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def unfreeze_epochs(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Epochs whose set of trainable backbone stages grew."""
    return [b["epoch"] for a, b in zip(rows, rows[1:]) if len(b["unfrozen"]) > len(a["unfrozen"])] + (
        [rows[0]["epoch"]] if rows and rows[0]["unfrozen"] else []
    )


def lr_cut_epochs(rows: Sequence[dict[str, Any]]) -> list[int]:
    return [b["epoch"] for a, b in zip(rows, rows[1:]) if b["lr"][0] < a["lr"][0]]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy, validation screening metrics (when logged) and learning rate per epoch,
    with unfreezing and lr cuts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    screening = "val_auroc" in rows[0]
    figure, axes = plt.subplots(
        1, 4 if screening else 3, figsize=(20 if screening else 15, 4.2), constrained_layout=True
    )
    panels = (
        ("Loss (class-weighted CE)", "train_loss", "val_loss"),
        ("Accuracy", "train_acc", "val_acc"),
    )
    for axis, (title, train_key, val_key) in zip(axes, panels):
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
        axes[2].set(title="Validation screening (each epoch's own threshold)", ylim=(0, 1.02))
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
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)

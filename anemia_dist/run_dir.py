"""The run directory ``run.output_dir/run.name``: the name of every file a run holds, and the
writer the training loop uses (it writes on the main process only, does nothing on the others).

Every other module takes its file names from here, so a file is renamed in one place.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
SPLITS = "splits.csv"
AUDIT_CSV = "audit.csv"
AUDIT_JSON = "audit.json"
EXCLUDED = "excluded.csv"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
PREEMPTED = "preempted.json"
CHECKPOINTS = "checkpoints"
"""Full training state per epoch, one folder each (:mod:`anemia_dist.checkpointing`)."""
CHECKPOINT_INFO = "checkpoint.json"
"""In each checkpoint folder: what it was written for (identity) and where training stood."""
BEST = "best"
"""The best epoch's exported model: :data:`WEIGHTS` and :data:`META`."""
WEIGHTS = "model.safetensors"
META = "meta.json"
REPORT = "report"
"""The best epoch's validation report; ``evaluate`` writes the same files into its own folder."""
REPORT_PAGE = "report.html"
VALIDATION = "validation.json"
PREDICTIONS = "predictions.csv"
ROC = "roc.png"
PRECISION_RECALL = "precision_recall.png"
CONFUSION = "confusion.png"
RELIABILITY = "reliability.png"
TENSORBOARD_EVENTS = "tensorboard"
"""TensorBoard event files, when ``tracking.tensorboard_dir`` is unset (:mod:`anemia_dist.tracking`)."""
STUDY_JSON = "study.json"
"""A study directory's pooled numbers (:mod:`anemia_dist.study_report`); its folds are run directories."""
STUDY_PLAN = "study_plan.json"
"""A study's test folds and its flow of counts (:mod:`anemia_dist.study`)."""
FOLDS = "folds.csv"
"""Every image a study uses, with its split unit and its test fold."""
OOF_PREDICTIONS = "oof_predictions.csv"
"""Every image's out-of-fold probability and its fold's decision."""
STUDY_PAGE = "study.html"
FOREST = "forest.png"
TRAIN_DATA = "train_data.csv"
"""In a study's fold: the manifest the fold trains (and picks its validation split) on."""
TEST_DATA = "test_data.csv"
"""In a study's fold: the held-out test fold's manifest."""
TEST_JSON = "test.json"
"""In a study's fold: ``evaluate``'s record on the test fold (written last: the fold is done)."""
TEST_REPORT = "test_report"
MLFLOW_STORE = "mlflow.db"
"""In run.output_dir, shared by the runs there: the default MLflow store, a SQLite file."""
MLFLOW_ARTIFACTS = "mlartifacts"
"""In run.output_dir: artifacts of the experiments the default MLflow store creates."""


class RunDirectory:
    """Writes into the run directory on the main process; on the other ranks every write is a no-op,
    so the loop never branches on the rank."""

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
        return (self.path / METRICS).is_file()

    def remove(self, name: str) -> None:
        if self.writes:
            (self.path / name).unlink(missing_ok=True)

    def keep_metrics_through(self, epoch: int) -> list[dict[str, Any]]:
        """On resume: drop rows of epochs after the checkpoint (they will be run again)."""
        if not self.writes:
            return []
        rows = [row for row in read_metrics(self.path) if row["epoch"] <= epoch]
        self.write_text(METRICS, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        if self.writes:
            with (self.path / METRICS).open("a") as handle:
                handle.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none when it has none yet)."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def unfreeze_epochs(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Epochs whose set of trainable backbone stages grew."""
    return [b["epoch"] for a, b in pairwise(rows) if len(b["unfrozen"]) > len(a["unfrozen"])] + (
        [rows[0]["epoch"]] if rows and rows[0]["unfrozen"] else []
    )

"""``evaluate`` and ``predict`` for a haemoglobin model (``model.task=regress``).

The scale, the recalibration and the conformal interval radius come from ``best/meta.json``,
fitted on the run's validation split; nothing is re-tuned on the data at hand. ``evaluate`` runs
on 1..N processes with the same numbers (every image's prediction is gathered exactly once).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config, parse_override
from .datasets import Retargeted
from .errors import ConfigError, DataError
from .hb_report import bounds_text, hb_record, write_hb_report
from .inference import ReadOrReport, default_report_dir, evaluation_config, load_best, model_inputs
from .quality import list_inputs
from .run_dir import META
from .sources import Sample, load_source
from .splits import MEASURE_COLUMN, THRESHOLD_COLUMN
from .tasks import REGRESS, HbPoint, gather_outputs

PREDICTION_COLUMNS = ["path", "hb", "hb_low", "hb_high", "anemic", "error"]


def is_regression(checkpoint_dir: str | Path) -> bool:
    path = Path(checkpoint_dir) / META
    return path.is_file() and json.loads(path.read_text()).get("task") == REGRESS


def load_hb_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any], HbPoint]:
    model, meta = load_best(checkpoint_dir)
    model.to(memory_format=torch.channels_last)
    return model, meta, HbPoint.from_meta(meta)


def hb_config(data: str | Path, overrides: Sequence[str], meta: dict[str, Any]) -> tuple[Config, list[float]]:
    """The data settings (as for ``evaluate``) and ``eval.hb_thresholds``; a run's splits.csv is read
    with its measure and threshold columns unless data.measure_column says otherwise. Rows below
    their threshold get the model's positive class, the others its other class."""
    cut_offs = list(meta.get("hb_thresholds", []))  # the run's eval.hb_thresholds, unless overridden
    rest = []
    for override in overrides:
        key, value = parse_override(override)
        if key == "eval.hb_thresholds":
            cut_offs = [float(v) for v in (value or [])]
        else:
            rest.append(override)
    cfg = evaluation_config(data, rest)
    if cfg.data.measure_column is None and cfg.data.manifest is not None:
        with open(cfg.data.manifest, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        if MEASURE_COLUMN in header and THRESHOLD_COLUMN in header:  # a run's splits.csv
            cfg.data = dataclasses.replace(cfg.data, measure_column=MEASURE_COLUMN, threshold_column=THRESHOLD_COLUMN)
    positive = meta["positive_class"]
    other = next(c for c in meta["classes"] if c != positive)
    cfg.data = dataclasses.replace(cfg.data, below_label=positive, above_label=other)
    if cfg.data.measure_column is None:
        raise ConfigError(
            "data.measure_column: a regression model is evaluated against measurements; name the manifest's "
            "Hb column and its threshold (data.threshold, data.threshold_column or data.threshold_rules)"
        )
    return cfg, cut_offs


def evaluate_hb(
    checkpoint_dir: str | Path,
    data: str | Path,
    overrides: Sequence[str] = (),
    batch_size: int = 64,
    out: str | Path | None = None,
    report_dir: str | Path | None = None,
    split: str | None = None,
) -> dict[str, Any] | None:
    """The regression counterpart of :func:`anemia_dist.inference.evaluate`; the record on the main process."""
    model, meta, point = load_hb_model(checkpoint_dir)
    cfg, cut_offs = hb_config(data, overrides, meta)
    accelerator = Accelerator()
    samples, _ = load_source(cfg.data.root, cfg.data.manifest, meta["classes"], cfg.data.group_column, cfg.data)
    samples = [s for s in samples if split is None or s.split == split]
    unusable = [s.path for s in samples if not Path(s.path).is_file() or math.isnan(s.value)]
    if unusable or not samples:
        raise DataError(f"{data}: {len(unusable)} row(s) without an image file or a measurement: {unusable[:20]}")
    targets = torch.tensor([[s.value, s.threshold] for s in samples], dtype=torch.float64)
    loader = DataLoader(Retargeted(model_inputs(samples, meta, cfg.data.cache_dir), targets), batch_size=batch_size)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    z, _ = gather_outputs(accelerator, model, accelerator.prepare_data_loader(loader))
    record = None
    if accelerator.is_main_process:
        predicted = point.calibrated(point.scale.restore(z).numpy())
        record, thresholds = hb_record(samples, predicted, point, cut_offs, cfg.eval.bootstrap)
        record = {"checkpoint": str(checkpoint_dir), "data": str(data), **record}
        report = Path(report_dir) if report_dir else default_report_dir(out)
        record["report"] = str(write_hb_report(report, samples, predicted, point, record, thresholds))
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return record


# --------------------------------------------------------------------------- predict


@torch.no_grad()
def predict_hb(
    checkpoint_dir: str | Path, inputs: Sequence[str | Path], batch_size: int = 64, num_workers: int = 4
) -> list[dict[str, Any]]:
    """One row per file: predicted Hb, its interval, anemic at the run's data.threshold (blank when the
    run used per-row thresholds: those need a manifest, so use ``evaluate``), or the read error."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("predict runs in one process; start it without accelerate launch")
    model, meta, point = load_hb_model(checkpoint_dir)
    listed = list_inputs(inputs)
    if not listed:
        raise DataError(f"no files in {', '.join(map(str, inputs))}")
    blank = {"hb": "", "hb_low": "", "hb_high": "", "anemic": ""}
    rows = [{"path": str(path), **blank, "error": error} for path, error in listed]
    todo = [i for i, (_, error) in enumerate(listed) if not error]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    images = model_inputs([Sample(str(listed[i][0]), 0, str(listed[i][0])) for i in todo], meta)
    loader = DataLoader(ReadOrReport(images, meta["image_size"]), batch_size=batch_size, num_workers=num_workers)
    outputs, errors = [torch.zeros(0)], []
    for batch, batch_errors in tqdm(loader, desc="predict", file=sys.stderr):
        outputs.append(model(images.batch_transform(batch.to(device))).float()[:, 0].cpu())
        errors += batch_errors
    predicted = point.calibrated(point.scale.restore(torch.cat(outputs)).numpy())
    for index, hb, error in zip(todo, predicted, errors, strict=True):
        if error:
            rows[index]["error"] = error
            continue
        low, high = bounds_text(hb, point.radius)
        anemic = "" if point.threshold is None else int(hb < point.threshold)
        rows[index].update(hb=f"{hb:.3f}", hb_low=low, hb_high=high, anemic=anemic)
    return rows


def write_hb_predictions(rows: Sequence[dict[str, Any]], handle: TextIO) -> None:
    writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)

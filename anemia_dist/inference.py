"""Using a saved model (``RUN/best``): load it, ``evaluate`` it on labelled images, ``predict`` on
image files.

Both read the preprocessing (image size, alpha background), the positive class, the operating
threshold and the temperature from ``best/meta.json``, so nothing is re-tuned on the data at hand.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .batch_augment import EvalResize
from .config import Config, DataConfig, ModelConfig, load_config, parse_override
from .datasets import CachedImages, DecodedOnAccess
from .distributed import collective_timeout
from .errors import ConfigError, DataError
from .explain import confident_errors, explain_files, overlay_names
from .metrics import OperatingPoint, Predictions, apply_temperature, negative_name, summarize
from .model import build_model
from .quality import REJECTED, list_inputs, screen
from .report import Explainer, Gallery, write_report
from .run_dir import META, PREDICTIONS, WEIGHTS, read_metrics
from .sources import Sample, load_source
from .tasks import REGRESS
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .validation import validate

logger = get_logger(__name__)

# Settings that belong to the model: evaluating with other values would not test the saved model.
FROM_CHECKPOINT = {"data.image_size", "data.alpha_background", "data.classes", "data.root", "data.manifest"}
# Besides data.*: the keys evaluate takes.
EVALUATE_KEYS = ("eval.bootstrap", "train.collective_timeout_minutes")


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise DataError(f"{path}: not a best-model directory (expected {META} and {WEIGHTS})")
    return json.loads(path.read_text())


def load_best(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model (``RUN/best``) for inference: eval mode, on the CPU."""
    meta = read_meta(directory)
    arch = ModelConfig(arch=meta["arch"], weights="none", hidden=meta["hidden"], dropout=meta["dropout"])
    outputs = 1 if meta.get("task") == REGRESS else len(meta["classes"])  # regress: Hb
    model = build_model(arch, outputs, meta["image_size"])
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS)))
    return model.eval(), meta


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any], OperatingPoint]:
    """The exported model, its meta.json and its operating point, ready for the inputs of :func:`model_inputs`."""
    model, meta = load_best(directory)
    if meta.get("task") == REGRESS:
        raise ConfigError(f"{directory}: a haemoglobin model; use anemia_dist.hb_evaluation (the CLI does)")
    model.to(memory_format=torch.channels_last)  # the layout of model_inputs' batches, as in training
    return model, meta, OperatingPoint.from_meta(meta, str(Path(directory) / META))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def in_training_precision(model: torch.nn.Module, meta: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The forward under the autocast training validated in (``meta.json``'s ``mixed_precision``).

    The threshold and temperature were fitted on those scores; fp32 scores of the same image can
    fall on the other side of the threshold. Checkpoints from before the key was saved score in fp32.
    """
    dtype = AUTOCAST_DTYPES.get(meta.get("mixed_precision", "no"))
    if dtype is not None:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return model


def model_inputs(samples: Sequence[Sample], meta: dict[str, Any], cache_dir: str | None = None) -> CachedImages:
    """The images decoded as training decoded its validation images (uint8 at the saved size;
    ``batch_transform`` normalises a batch on the device), so the saved threshold meets the
    scores it was chosen on."""
    size = meta["image_size"]
    decoded = DecodedOnAccess([s.path for s in samples], size, meta["alpha_background"], cache_dir)
    return CachedImages(decoded, [s.label for s in samples], EvalResize(size, normalization=normalization(meta)))


def normalization(meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The (mean, std) training normalised with (ImageNet's in checkpoints from before meta.json held it)."""
    saved = meta.get("normalization", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    return saved["mean"], saved["std"]


# --------------------------------------------------------------------------- evaluate


def evaluation_config(data: str | Path, overrides: Sequence[str]) -> Config:
    """``data.*`` overrides say how to read ``data`` (manifest columns, label rule, workers);
    ``eval.bootstrap`` sets the resamples, ``train.collective_timeout_minutes`` how long the other
    ranks wait for the main process's report. Everything else comes from the checkpoint."""
    for override in overrides:
        key, _ = parse_override(override)
        if key in FROM_CHECKPOINT or not (key.startswith("data.") or key in EVALUATE_KEYS):
            raise ConfigError(
                f"{key}: evaluate takes only data.* keys saying how to read --data, {', '.join(EVALUATE_KEYS)}; the "
                f"images come from --data, and the preprocessing, classes, positive class, threshold and "
                f"temperature from the checkpoint's meta.json"
            )
    cfg = load_config(None, overrides)
    data = Path(data)
    if data.is_file():
        cfg.data = dataclasses.replace(cfg.data, manifest=str(data))
    elif data.is_dir():
        cfg.data = dataclasses.replace(cfg.data, root=str(data))
    else:
        raise DataError(f"{data}: --data must be an image folder (one sub-folder per class) or a manifest CSV")
    return cfg


def evaluate(
    checkpoint_dir: str | Path,
    data: str | Path,
    overrides: Sequence[str] = (),
    batch_size: int = 64,
    out: str | Path | None = None,
    report_dir: str | Path | None = None,
    split: str | None = None,
    quality_gate: bool = True,
) -> dict[str, Any] | None:
    """Metrics with intervals at the saved operating point; the record on the main process, else None.

    Runs on 1..N processes: :func:`~anemia_dist.validation.validate` gathers every image's probabilities exactly once,
    so the numbers do not depend on the number of processes. ``split`` keeps the manifest rows
    whose split column holds it (e.g. ``val`` of a run's splits.csv). Files the quality gate
    rejects (:mod:`anemia_dist.quality`) are listed in predictions.csv and the record, not scored.
    """
    cfg = evaluation_config(data, overrides)
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # from pinned memory, overlapping compute
        kwargs_handlers=[collective_timeout(cfg.train.collective_timeout_minutes)],
    )
    model, meta, point = load_model(checkpoint_dir)
    samples, classes = load_source(cfg.data.root, cfg.data.manifest, meta["classes"], cfg.data.group_column, cfg.data)
    if split is not None:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise DataError(f"{data}: no rows with split {split!r}; --split needs a manifest with a split column")
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise DataError(
            f"{data}: {len(missing)} listed image(s) do not exist:\n  {listed}\nFix the paths or remove the rows."
        )
    rejected: list[tuple[Sample, str]] = []
    if quality_gate:
        samples, rejected = gate_samples(samples, meta, cfg, accelerator)
    loader = DataLoader(
        model_inputs(samples, meta, cfg.data.cache_dir),
        batch_size=batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    # Not prepare_model: its autocast would be the launcher's (or a study's training run's), and
    # the checkpoint's precision is what the threshold was fitted in. No DDP for inference either.
    model = in_training_precision(model.to(accelerator.device), meta, accelerator.device)
    loader = accelerator.prepare_data_loader(loader)
    logger.info(
        f"evaluating {checkpoint_dir} on {len(samples)} images from {data}, {accelerator.num_processes} process(es)"
    )
    gathered = validate(accelerator, model, loader, torch.ones(len(classes)))

    record = None
    if accelerator.is_main_process:
        groups = [s.group for s in samples]
        evaluation = summarize(gathered.labels, gathered.probs, classes, point, cfg.eval.bootstrap, groups)
        record = {"checkpoint": str(checkpoint_dir), "data": str(data), **evaluation.result}
        report = Path(report_dir) if report_dir else default_report_dir(out)
        report.mkdir(parents=True, exist_ok=True)
        write_sample_predictions(report / PREDICTIONS, samples, classes, evaluation.pred.score, point, rejected)
        record["rejected"] = [{"path": s.path, "reason": reason} for s, reason in rejected]
        notes = [
            *rejection_notes(rejected),
            f"Data: {data}. Model: {checkpoint_dir} (epoch {meta.get('epoch')}).",
            f"The threshold {point.threshold:.4f} ({point.threshold_rule}) and the temperature {point.temperature:.3f} "
            f"were fixed on the validation split during training, not tuned on this data.",
        ]
        rows = read_metrics(Path(checkpoint_dir).resolve().parent)
        paths = [s.path for s in samples]
        explain = error_explainer(checkpoint_dir, paths, report, accelerator.device, cfg.data.cache_dir)
        page = write_report(report, f"Evaluation on {Path(data).name}", evaluation, notes, rows, explain)
        record["report"] = str(page)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return record


def gate_samples(
    samples: Sequence[Sample], meta: dict[str, Any], cfg: Config, accelerator: Accelerator
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """The samples the quality gate accepts, and the rejected ones with the reason (an unreadable
    file's error included). Measured on the main process; every rank gets its decision."""
    verdicts: list[Any] = [None]
    if accelerator.is_main_process:
        verdicts = [screen([s.path for s in samples], meta, cfg.data.min_size, cfg.data.num_workers)]
    verdicts = broadcast_object_list(verdicts)[0]
    accepted = [s for s, v in zip(samples, verdicts, strict=True) if v.accepted]
    rejected = [
        (s, v.reason or f"cannot be read: {v.error}") for s, v in zip(samples, verdicts, strict=True) if not v.accepted
    ]
    if not accepted:
        raise DataError(
            f"every one of the {len(samples)} images was rejected by the quality gate, e.g. "
            f"{rejected[0][0].path}: {rejected[0][1]}; see --no-quality-gate"
        )
    return accepted, rejected


def rejection_notes(rejected: Sequence[tuple[Sample, str]]) -> list[str]:
    if not rejected:
        return []
    return [
        f"{len(rejected)} file(s) rejected by the quality gate and not scored (listed in {PREDICTIONS} and the "
        f"record's 'rejected'); the metrics cover the remaining images."
    ]


def default_report_dir(out: str | Path | None) -> Path:
    """``FILE_report/`` next to ``--out FILE``, else ``evaluation_report/`` here."""
    return Path(out).with_name(Path(out).stem + "_report") if out else Path("evaluation_report")


def write_sample_predictions(
    path: Path,
    samples: Sequence[Sample],
    classes: Sequence[str],
    scores: np.ndarray,
    point: OperatingPoint,
    rejected: Sequence[tuple[Sample, str]] = (),
) -> None:
    negative = negative_name(classes, point.positive_class)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "probability", "prediction", "reason"])
        for sample, score in zip(samples, scores, strict=True):
            decision = point.positive_class if score >= point.threshold else negative
            writer.writerow([sample.path, classes[sample.label], sample.group, f"{score:.6f}", decision, ""])
        for sample, reason in rejected:
            writer.writerow([sample.path, classes[sample.label], sample.group, "", REJECTED, reason])


# --------------------------------------------------------------------------- predict


class ReadOrReport(Dataset):
    """The evaluation inputs, with a file that cannot be decoded reported instead of raised."""

    def __init__(self, images: CachedImages, size: int):
        self.images = images
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.images[index][0], ""
        except Exception as error:  # any decoding failure belongs to this file, not to the run
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(error).__name__}: {error}"


@torch.no_grad()
def predict(
    checkpoint_dir: str | Path,
    inputs: Sequence[str | Path],
    batch_size: int = 64,
    num_workers: int = 4,
    quality_gate: bool = True,
    explain_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One row per file given or found: P(positive class) and the decision at the saved threshold;
    or ``rejected`` with the quality gate's reason (:mod:`anemia_dist.quality`); or the read error.
    ``explain_dir``: a Grad-CAM overlay per scored photo (:mod:`anemia_dist.explain`), named in the
    row's ``heatmap``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "predict runs in one process (on the GPU when there is one); start it without accelerate launch"
        )
    model, meta, point = load_model(checkpoint_dir)
    listed = list_inputs(inputs)
    if not listed:
        raise DataError(f"no files in {', '.join(map(str, inputs))}")
    rows = [{"path": str(p), "probability": "", "prediction": "", "reason": "", "error": e} for p, e in listed]
    todo = [i for i, (_, error) in enumerate(listed) if not error]
    if quality_gate:
        verdicts = screen([listed[i][0] for i in todo], meta, DataConfig().min_size, num_workers)
        for index, verdict in zip(todo, verdicts, strict=True):
            rows[index].update(error=verdict.error, reason=verdict.reason)
            if verdict.reason:
                rows[index]["prediction"] = REJECTED
        todo = [i for i, verdict in zip(todo, verdicts, strict=True) if verdict.accepted]
    scores = score_files(model, meta, point, [listed[i][0] for i in todo], batch_size, num_workers)
    negative = negative_name(meta["classes"], point.positive_class)
    for index, (score, error) in zip(todo, scores, strict=True):
        if error:
            rows[index]["error"] = error
        else:
            decision = point.positive_class if score >= point.threshold else negative
            rows[index].update(probability=f"{score:.6f}", prediction=decision)
    if explain_dir is not None:
        scored = [rows[i] for i in todo if rows[i]["probability"]]
        names = overlay_names([row["path"] for row in scored])
        targets = [Path(explain_dir) / name for name in names]
        write_overlays(
            model, meta, point, [(row["path"], float(row["probability"])) for row in scored], targets, batch_size
        )
        for row, target in zip(scored, targets, strict=True):
            row["heatmap"] = str(target)
    return rows


# --------------------------------------------------------------------------- heat-maps


MOST_CONFIDENT = 8
"""How many false negatives and false positives a report shows."""
ERRORS_FOLDER = "errors"
REPORT_SIDE = 384
"""Longest side of a report's overlays (the page embeds them)."""


def error_explainer(
    checkpoint_dir: str | Path,
    paths: Sequence[str],
    directory: Path,
    device: torch.device | None = None,
    cache_dir: str | None = None,
) -> Explainer:
    """A report's galleries: the most confident false negatives and false positives among ``paths``
    (in the order of the report's predictions), each with its Grad-CAM overlay in ``directory/errors``.
    The model's inputs are read from ``cache_dir`` where it holds them."""

    def explain(pred: Predictions) -> list[Gallery]:
        try:
            return draw(pred)
        except ConfigError as error:  # a backbone without a spatial map (a transformer): the report goes on
            return [Gallery("Most confident errors", f"No heat-maps: {error}.")]

    def draw(pred: Predictions) -> list[Gallery]:
        model, meta, point = load_model(checkpoint_dir)
        model.to(device or "cpu")
        shutil.rmtree(directory / ERRORS_FOLDER, ignore_errors=True)  # no overlays of an earlier report
        classes, positive = meta["classes"], point.positive_class
        misses, alarms = confident_errors(pred.truth, pred.score, point.threshold, MOST_CONFIDENT)
        kinds = [
            (
                "fn",
                misses,
                f"Most confident false negatives: {positive} images the model called "
                f"{negative_name(classes, positive)}, lowest P({positive}) first",
            ),
            (
                "fp",
                alarms,
                f"Most confident false positives: images called {positive} that are not, highest P({positive}) first",
            ),
        ]
        galleries = []
        for prefix, indices, title in kinds:
            names = [f"{ERRORS_FOLDER}/{prefix}-{rank + 1:02d}.png" for rank in range(len(indices))]
            scored = [(paths[i], float(pred.score[i])) for i in indices]
            targets = [directory / name for name in names]
            write_overlays(model, meta, point, scored, targets, MOST_CONFIDENT, REPORT_SIDE, cache_dir)
            captions = [f"{Path(path).name}: P({positive}) = {score:.3f}" for path, score in scored]
            note = (
                f"Up to {MOST_CONFIDENT}, with Grad-CAM heat-maps (red: where the evidence for the model's "
                f"decision lay); no EXIF is copied from the photos."
            )
            galleries.append(Gallery(title, note, list(zip(names, captions, strict=True))))
        return galleries

    return explain


def write_overlays(
    model: torch.nn.Module,
    meta: dict[str, Any],
    point: OperatingPoint,
    scored: Sequence[tuple[str, float]],
    targets: Sequence[Path],
    batch_size: int,
    max_side: int | None = None,
    cache_dir: str | None = None,
) -> None:
    """The Grad-CAM overlay of each (path, P(positive)) to its target, ``batch_size`` photos at a time."""
    if not scored:
        return
    model.eval()
    images = model_inputs([Sample(path, 0, path) for path, _ in scored], meta, cache_dir)
    device = next(model.parameters()).device
    for start in range(0, len(scored), batch_size):
        part = range(start, min(start + batch_size, len(scored)))
        batch = torch.stack([images[i][0] for i in part]).to(device)
        explain_files(
            model,
            meta,
            point,
            images.batch_transform(batch),
            [scored[i][1] for i in part],
            [scored[i][0] for i in part],
            [targets[i] for i in part],
            max_side,
        )


def score_files(
    model: torch.nn.Module,
    meta: dict[str, Any],
    point: OperatingPoint,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
) -> list[tuple[float, str]]:
    """(P(positive class), read error) per file, on the GPU when there is one."""
    if not paths:
        return []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = in_training_precision(model.to(device), meta, device)
    images = model_inputs([Sample(str(p), 0, str(p)) for p in paths], meta)
    loader = DataLoader(
        ReadOrReport(images, meta["image_size"]),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    positive = meta["classes"].index(point.positive_class)
    probs, errors = [], []
    for batch, batch_errors in tqdm(loader, desc="predict", file=sys.stderr):
        inputs = images.batch_transform(batch.to(device, non_blocking=True))  # from pinned memory
        probs.append(model(inputs).float().softmax(dim=1))
        errors += batch_errors
    # One copy to the host for the whole pass, not a wait for the device per batch.
    scores = apply_temperature(torch.cat(probs).double().cpu().numpy(), point.temperature)[:, positive]
    return list(zip(scores.tolist(), errors, strict=True))


def write_predictions(rows: Sequence[dict[str, Any]], handle: TextIO) -> None:
    fields = ["path", "probability", "prediction", "reason", "error"]
    if any("heatmap" in row for row in rows):
        fields.append("heatmap")
    writer = csv.DictWriter(handle, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .batch_augment import EvalResize
from .config import Config, ModelConfig, load_config, parse_override
from .datasets import CachedImages, DecodedOnAccess
from .errors import ConfigError, DataError
from .images import IMAGE_EXTENSIONS
from .metrics import OperatingPoint, apply_temperature, negative_name, summarize
from .model import build_model
from .report import write_report
from .run_dir import META, PREDICTIONS, WEIGHTS, read_metrics
from .sources import Sample, find_image_files, load_source
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .validation import validate

logger = get_logger(__name__)

# Settings that belong to the model: evaluating with other values would not test the saved model.
FROM_CHECKPOINT = {"data.image_size", "data.alpha_background", "data.classes", "data.root", "data.manifest"}


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise DataError(f"{path}: not a best-model directory (expected {META} and {WEIGHTS})")
    return json.loads(path.read_text())


def load_best(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model (``RUN/best``) for inference: eval mode, on the CPU."""
    meta = read_meta(directory)
    arch = ModelConfig(arch=meta["arch"], weights="none", hidden=meta["hidden"], dropout=meta["dropout"])
    model = build_model(arch, len(meta["classes"]), meta["image_size"])
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS)))
    return model.eval(), meta


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any], OperatingPoint]:
    """The exported model, its meta.json and its operating point, ready for the inputs of :func:`model_inputs`."""
    model, meta = load_best(directory)
    model.to(memory_format=torch.channels_last)  # the layout of model_inputs' batches, as in training
    return model, meta, OperatingPoint.from_meta(meta, str(Path(directory) / META))


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
    ``eval.bootstrap`` sets the resamples. Everything else comes from the checkpoint."""
    for override in overrides:
        key, _ = parse_override(override)
        if key in FROM_CHECKPOINT or not (key.startswith("data.") or key == "eval.bootstrap"):
            raise ConfigError(
                f"{key}: evaluate takes only data.* keys saying how to read --data, and eval.bootstrap; the "
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
) -> dict[str, Any] | None:
    """Metrics with intervals at the saved operating point; the record on the main process, else None.

    Runs on 1..N processes: :func:`~anemia_dist.validation.validate` gathers every image's probabilities exactly once,
    so the numbers do not depend on the number of processes. ``split`` keeps the manifest rows
    whose split column holds it (e.g. ``val`` of a run's splits.csv).
    """
    cfg = evaluation_config(data, overrides)
    accelerator = Accelerator()
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
    loader = DataLoader(
        model_inputs(samples, meta, cfg.data.cache_dir),
        batch_size=batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    model = accelerator.prepare_model(model, evaluation_mode=True)
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
        write_sample_predictions(report / PREDICTIONS, samples, classes, evaluation.pred.score, point)
        notes = [
            f"Data: {data}. Model: {checkpoint_dir} (epoch {meta.get('epoch')}).",
            f"The threshold {point.threshold:.4f} ({point.threshold_rule}) and the temperature {point.temperature:.3f} "
            f"were fixed on the validation split during training, not tuned on this data.",
        ]
        rows = read_metrics(Path(checkpoint_dir).resolve().parent)
        page = write_report(report, f"Evaluation on {Path(data).name}", evaluation, notes, rows)
        record["report"] = str(page)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return record


def default_report_dir(out: str | Path | None) -> Path:
    """``FILE_report/`` next to ``--out FILE``, else ``evaluation_report/`` here."""
    return Path(out).with_name(Path(out).stem + "_report") if out else Path("evaluation_report")


def write_sample_predictions(
    path: Path, samples: Sequence[Sample], classes: Sequence[str], scores: np.ndarray, point: OperatingPoint
) -> None:
    negative = negative_name(classes, point.positive_class)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "probability", "prediction"])
        for sample, score in zip(samples, scores, strict=True):
            decision = point.positive_class if score >= point.threshold else negative
            writer.writerow([sample.path, classes[sample.label], sample.group, f"{score:.6f}", decision])


# --------------------------------------------------------------------------- predict


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image file under each folder (recursively, sorted)."""
    found, absent = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found += find_image_files(item)
        elif item.is_file():
            found.append(item)
        else:
            absent.append(str(item))
    if absent:
        raise DataError(f"no such file or folder: {', '.join(absent)}")
    if not found:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return found


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
    checkpoint_dir: str | Path, inputs: Sequence[str | Path], batch_size: int = 64, num_workers: int = 4
) -> list[dict[str, Any]]:
    """One row per file: P(positive class) and the decision at the saved threshold, or the read error."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "predict runs in one process (on the GPU when there is one); start it without accelerate launch"
        )
    model, meta, point = load_model(checkpoint_dir)
    paths = find_images(inputs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    images = model_inputs([Sample(str(p), 0, str(p)) for p in paths], meta)
    loader = DataLoader(
        ReadOrReport(images, meta["image_size"]),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    positive = meta["classes"].index(point.positive_class)
    negative = negative_name(meta["classes"], point.positive_class)
    scores, errors = [], []
    for batch, batch_errors in tqdm(loader, desc="predict", file=sys.stderr):
        inputs = images.batch_transform(batch.to(device, non_blocking=True))
        probs = model(inputs).float().softmax(dim=1).double().cpu().numpy()
        scores.append(apply_temperature(probs, point.temperature)[:, positive])
        errors += batch_errors
    rows = []
    for path, score, error in zip(paths, np.concatenate(scores), errors, strict=True):
        if error:
            rows.append({"path": str(path), "probability": "", "prediction": "", "error": error})
        else:
            decision = point.positive_class if score >= point.threshold else negative
            rows.append({"path": str(path), "probability": f"{score:.6f}", "prediction": decision, "error": ""})
    return rows


def write_predictions(rows: Sequence[dict[str, Any]], handle: TextIO) -> None:
    writer = csv.DictWriter(handle, fieldnames=["path", "probability", "prediction", "error"])
    writer.writeheader()
    writer.writerows(rows)

"""``anemia-dist export``: the best model as one portable file that holds its own preprocessing.

``anemia-dist predict`` does this to a file's pixels (``cache.decode``, then ``EvalResize``):

1. Pillow opens the file; a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
   both sides at least the training size (``draft``);
2. EXIF orientation, the embedded colour profile converted to sRGB, alpha composited onto the
   saved background colour (:func:`anemia_dist.images.decode_rgb`);
3. Pillow's BILINEAR resize (antialiased: its filter widens with the reduction) to the square
   training size, rounded to uint8;
4. on the device: /255 and the ImageNet normalisation (``EvalResize``: its resize does nothing,
   the picture already has the training size), the network, softmax, the temperature.

The exported graph takes uint8 RGB [batch, height, width, 3] of any size and does 3-4: its resize
is the identity at the training size, so a caller who does 1-3 with Pillow (a dozen lines, in the
README) gets ``predict``'s probabilities to float rounding (about 1e-6). Other sizes are resized
in the graph with antialiased bilinear interpolation on uint8, which torch and ONNX Runtime
compute after Pillow's algorithm but not bit for bit (Pillow 13 also picks which pass runs
first): a few percent of values differ by 1/255, which moves P by up to about 2e-4. It outputs
P(positive class) after the temperature; what a user needs besides (classes, positive class,
threshold, rule, image size, background, version) is in the file's metadata: ONNX
``metadata_props``, or ``meta.json`` among TorchScript's extra files.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .datasets import decode
from .errors import ConfigError, DataError
from .inference import load_best, normalization
from .metrics import OperatingPoint, negative_name
from .run_dir import META, SPLITS
from .sources import Sample, load_source

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OPSET = 20
"""ONNX opset: Resize has the ``antialias`` attribute from opset 18 on; 20 is torch 2.14's default."""
SELF_CHECK_TOLERANCE = 1e-4
METADATA_FILE = META
"""The TorchScript extra file holding the metadata (named as in ``best/``)."""


class ExportError(RuntimeError):
    """The written file does not compute what the checkpoint computes."""


class Preprocess(nn.Module):
    """uint8 RGB [N, H, W, 3], any H and W -> the normalised float batch [N, 3, S, S] of training.

    The resize runs on uint8 and rounds, as Pillow's does (torch's and ONNX Runtime's antialiased
    bilinear kernels for uint8 follow Pillow's fixed-point algorithm); at S x S it is the identity."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.image_size = image_size
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_tensor))
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_tensor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        square = F.interpolate(
            images.permute(0, 3, 1, 2),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return square.float() * self.scale + self.shift


class PositiveProbability(nn.Module):
    """Logits -> P(positive class) after temperature scaling, as ``predict`` reports it."""

    def __init__(self, temperature: float, positive: int):
        super().__init__()
        self.temperature = float(temperature)
        self.positive = positive

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() / self.temperature).softmax(dim=1)[:, self.positive]


class PortableModel(nn.Module):
    """Preprocessing, network and readout in one module: what the exported file computes."""

    def __init__(self, preprocess: Preprocess, network: nn.Module, readout: nn.Module):
        super().__init__()
        self.preprocess, self.network, self.readout = preprocess, network, readout

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.readout(self.network(self.preprocess(image)))


@dataclass
class Readout:
    """What the file outputs, per task: its module, the output's name and the metadata to use it."""

    module: nn.Module
    output_name: str
    metadata: dict[str, Any]


def readout_for(meta: dict[str, Any], where: str) -> Readout:
    """A classification checkpoint outputs P(positive class); the decision needs the threshold.

    A task's checkpoint says what it is in ``meta["task"]`` (classification when absent); a task
    with another output (e.g. haemoglobin in g/dL) adds its readout here."""
    task = meta.get("task", "classification")
    if task != "classification":
        raise ConfigError(f"{where}: task {task!r}: this version exports classification checkpoints only")
    point = OperatingPoint.from_meta(meta, where)
    classes = list(meta["classes"])
    return Readout(
        PositiveProbability(point.temperature, classes.index(point.positive_class)),
        "probability",
        {
            "classes": classes,
            **point.to_meta(),
            "negative_class": negative_name(classes, point.positive_class),
            "output": f"P({point.positive_class}) after temperature scaling; call {point.positive_class} when "
            f">= threshold",
        },
    )


def portable_model(directory: str | Path) -> tuple[PortableModel, dict[str, str]]:
    """The checkpoint as one eval-mode module, and the metadata the file will carry (string values;
    lists and numbers JSON-encoded)."""
    directory = Path(directory)
    network, meta = load_best(directory)
    readout = readout_for(meta, str(directory / META))
    mean, std = normalization(meta)
    preprocess = Preprocess(meta["image_size"], mean, std)  # predict's constants (EvalResize)
    model = PortableModel(preprocess, network, readout.module).eval()
    metadata = {
        "anemia_dist_version": __version__,
        "task": meta.get("task", "classification"),
        "arch": meta["arch"],
        "epoch": meta.get("epoch"),
        "input": f"{INPUT_NAME}: uint8 RGB [batch, height, width, 3], any size; as predict: JPEGs decoded at the "
        f"reduced DCT scale that keeps both sides >= image_size (Pillow draft), EXIF orientation applied, sRGB, "
        f"alpha composited onto background, resized to image_size x image_size with Pillow's BILINEAR",
        "output_name": readout.output_name,
        "image_size": meta["image_size"],
        "background": list(meta["alpha_background"]),
        "normalization": {"mean": mean, "std": std},
        **readout.metadata,
    }
    return model, {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _example_images(image_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Random uint8 batches: a batch of two at an odd size, one image smaller than the training
    size and one at it (the exported graph must take all of them)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, image_size + 9, 2 * image_size + 5), (1, image_size // 2 + 3, image_size - 1)]
    shapes.append((1, image_size, image_size))
    return [torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator) for shape in shapes]


def write_onnx(model: PortableModel, metadata: dict[str, str], out: Path) -> None:
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    program = torch.onnx.export(
        model,
        (_example_images(model.preprocess.image_size)[0],),
        input_names=[INPUT_NAME],
        output_names=[metadata["output_name"]],
        dynamic_shapes={"image": {0: batch, 1: height, 2: width}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    program.save(str(out), external_data=False)


def write_torchscript(model: PortableModel, metadata: dict[str, str], out: Path) -> None:
    with _without_jit_deprecation():
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(out), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})


@contextmanager
def _without_jit_deprecation() -> Iterator[None]:
    """torch 2.14 marks torch.jit deprecated (a FutureWarning per call); the README says so once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def runner(path: Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 [N, H, W, 3] array -> outputs (float64), running the written file."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {INPUT_NAME: images})[0].astype(np.float64)
    with _without_jit_deprecation():
        loaded = torch.jit.load(str(path))
    return lambda images: loaded(torch.from_numpy(images)).double().numpy()


@torch.no_grad()
def self_check(model: PortableModel, path: Path, fmt: str) -> float:
    """Run the written file and the module on the same random images; the largest difference.

    Catches an exporter that computes something else (e.g. antialiased Resize without
    ``exclude_outside``, which older onnxscript versions wrote and which shifts edge pixels)."""
    run = runner(path, fmt)
    worst = 0.0
    for images in _example_images(model.preprocess.image_size, seed=1):
        expected = model(images).double().numpy()
        worst = max(worst, float(np.abs(run(images.numpy()) - expected).max()))
    if not worst <= SELF_CHECK_TOLERANCE:
        raise ExportError(
            f"{path}: the exported {fmt} model differs from the checkpoint by up to {worst:.2e} on test images "
            f"(tolerance {SELF_CHECK_TOLERANCE}); the exporter or runtime version computes something else"
        )
    return worst


# --------------------------------------------------------------------------- int8


def labelled_samples(checkpoint_dir: Path, data: str | Path | None, classes: Sequence[str]) -> tuple[list[Sample], str]:
    """``data`` (class folders or a manifest CSV), else the run's validation split (``splits.csv``
    beside ``best/``)."""
    if data is None:
        splits = Path(checkpoint_dir).resolve().parent / SPLITS
        if not splits.is_file():
            raise DataError(
                f"{splits}: no {SPLITS} beside the checkpoint to take the validation split from; "
                f"give labelled images with --data"
            )
        samples, _ = load_source(None, str(splits), classes, None)
        return [s for s in samples if s.split == "val"], f"{splits} (split val)"
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: --data must be an image folder (one sub-folder per class) or a manifest CSV")
    root, manifest = (str(data), None) if data.is_dir() else (None, str(data))
    samples, _ = load_source(root, manifest, classes, None)
    return samples, str(data)


def predict_pixels(samples: Sequence[Sample], metadata: dict[str, str]) -> np.ndarray:
    """The files as ``predict`` hands them to the network: the cache's decode (Pillow resize included),
    uint8 [N, S, S, 3]; the graph's resize is then the identity, so the fp32 file scores as ``predict``."""
    size, background = int(metadata["image_size"]), json.loads(metadata["background"])
    return np.stack([decode(sample.path, size, background).permute(1, 2, 0).numpy() for sample in samples])


def quantize(onnx_path: Path, out: Path) -> dict[str, int]:
    """Dynamic int8 quantisation (weights stored as 8-bit, activations quantised per call); the
    operator counts of the result, so the record shows that no convolution or matmul stayed float.

    Convolutions get uint8 weights: ONNX Runtime's CPU ConvInteger takes uint8 x uint8 only. The
    quantiser's log notes (run its shape pre-processing; the uint8 input cannot be quantised) do
    not apply to a graph the exporter already optimised, and are silenced."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(onnx_path, out, weight_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)
    ops = Counter(node.op_type for node in onnx.load(str(out), load_external_data=False).graph.node)
    return {op: ops[op] for op in ("ConvInteger", "MatMulInteger", "Conv", "MatMul", "Gemm")}


def quantized_parity(
    fp32: Path, int8: Path, samples: Sequence[Sample], metadata: dict[str, str], source: str
) -> dict[str, Any]:
    """What quantisation keeps, on labelled images: AUROC of both models, decisions at the saved threshold."""
    from sklearn.metrics import roc_auc_score

    if not samples:
        raise DataError(f"{source}: no labelled images to measure the quantised model on")
    classes = json.loads(metadata["classes"])
    positive, threshold = classes.index(metadata["positive_class"]), float(metadata["threshold"])
    pixels = predict_pixels(samples, metadata)
    runs = {name: runner(path, "onnx") for name, path in (("fp32", fp32), ("int8", int8))}
    chunks = np.array_split(pixels, math.ceil(len(pixels) / 64))  # batches of at most 64 images
    scores = {name: np.concatenate([run(chunk) for chunk in chunks]) for name, run in runs.items()}
    truth = np.array([s.label == positive for s in samples])
    both_classes = 0 < truth.sum() < len(truth)
    decisions = {name: score >= threshold for name, score in scores.items()}
    difference = np.abs(scores["int8"] - scores["fp32"])
    return {
        "data": source,
        "n": len(samples),
        "n_positive": int(truth.sum()),
        "threshold": threshold,
        "auroc_fp32": float(roc_auc_score(truth, scores["fp32"])) if both_classes else None,
        "auroc_int8": float(roc_auc_score(truth, scores["int8"])) if both_classes else None,
        "decisions_equal": int((decisions["fp32"] == decisions["int8"]).sum()),
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": int8.stat().st_size,
    }


def quantized_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.int8{out.suffix}")


def _check_installed(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"--format onnx needs {', '.join(missing)}: pip install 'anemia-dist[export]' (onnx, onnxscript, "
                f"onnxruntime)"
            )


def export(
    checkpoint_dir: str | Path, fmt: str, out: str | Path, quantized: bool = False, data: str | Path | None = None
) -> dict[str, Any]:
    """Write ``out`` in ``fmt`` (onnx or torchscript), check that it computes what the checkpoint
    does, and with ``quantized`` (ONNX only) write its int8 copy and the parity that copy keeps on
    labelled images (``data``, else the run's validation split)."""
    _check_installed(fmt)
    if quantized and fmt != "onnx":
        raise ConfigError("--quantize: int8 quantisation is for --format onnx (ONNX Runtime's quantiser)")
    out = Path(out)
    model, metadata = portable_model(checkpoint_dir)
    samples, source = (
        labelled_samples(Path(checkpoint_dir), data, json.loads(metadata["classes"])) if quantized else ([], "")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    (write_onnx if fmt == "onnx" else write_torchscript)(model, metadata, out)
    result = {"file": str(out), "format": fmt, "bytes": out.stat().st_size}
    result["self_check_max_abs_diff"] = self_check(model, out, fmt)
    if quantized:
        int8 = quantized_path(out)
        operators = quantize(out, int8)
        parity = quantized_parity(out, int8, samples, metadata, source)
        record = {"model": str(out), "quantized": str(int8), **parity, "operators_int8": operators}
        report = int8.with_suffix(".json")
        report.write_text(json.dumps(record, indent=2) + "\n")
        result["quantized"] = {"file": str(int8), "parity": str(report), **parity}
    return result

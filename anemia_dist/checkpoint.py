"""The best-model export (``RUN/best``): safetensors weights plus everything needed to use them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import build_head
from .transforms import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then swap it in: a crash leaves the old directory intact."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, target)


def publish_directory(tmp: Path, target: Path) -> None:
    """Flush a fully written ``tmp`` to disk and rename it to ``target``, replacing any old one."""
    for written in tmp.iterdir():
        if written.is_file():
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_best(model: torch.nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """``model`` is the unwrapped module; ``meta`` must hold arch, classes, image_size, epoch, val_loss,
    and the operating point (:meth:`anemia_dist.evaluation.OperatingPoint.to_meta`) that
    ``evaluate`` and ``predict`` apply."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, **meta}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a best-model directory (expected {META_FILE} and {WEIGHTS_FILE})")
    return json.loads(path.read_text())


def load_best(directory: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model for inference (eval mode, on the CPU)."""
    import torchvision

    meta = read_meta(directory)
    model = torchvision.models.get_model(meta["arch"], weights=None)
    model.fc = build_head(model.fc.in_features, meta["hidden"], meta["dropout"], len(meta["classes"]))
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval(), meta

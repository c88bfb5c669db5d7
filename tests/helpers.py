"""Shared test helpers: tiny settings, generated images and manifests, bad files, and a real
2-rank CPU launcher. Imported as ``helpers`` (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from anemia_dist.checkpointing import Checkpointer
from anemia_dist.cli import launch_command
from anemia_dist.config import load_config
from anemia_dist.metrics import OperatingPoint
from anemia_dist.model import build_model, set_train_mode
from anemia_dist.run_dir import BEST

ROOT = Path(__file__).resolve().parents[1]
CP_ANEMIC = ROOT.parent / "shared" / "data" / "cp-anemic"

# Small, fast settings every test run starts from (random init: no downloads here).
TINY = [
    "model.arch=resnet18",
    "model.weights=none",
    "model.hidden=16",
    "data.image_size=32",
    "data.num_workers=0",
    "train.batch_size=4",
]


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 24, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode == "RGBA":
        image = image.convert("RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_image_folder(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    """``root/<class>/img_<i>.png``; classes differ in colour so a model can learn them.

    The noise is seeded by the folder name too: folders such as train/ and val/ never share a
    byte-identical image, which the data audit would rightly stop as a leak across splits.
    """
    colours = [(200, 60, 60), (230, 180, 170), (60, 60, 200)]
    base = zlib.crc32(root.name.encode()) * 10_000
    for index, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_image(root / name / f"img_{i:03d}.png", colours[index % 3], size, seed=base + index * 1000 + i)
    return root


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_manifest(root: Path, counts: dict[str, int], per_group: int = 2, size: int = 24) -> Path:
    """Images plus ``manifest.csv`` (path,label,group) with ``per_group`` images per patient."""
    make_image_folder(root, counts, size)
    rows = []
    for name in counts:
        for i, path in enumerate(sorted((root / name).glob("*.png"))):
            rows.append({"path": str(path.relative_to(root)), "label": name, "group": f"{name}-p{i // per_group}"})
    return write_csv(root / "manifest.csv", rows)


def launch(args: list[str], num_processes: int = 2, env: dict | None = None, timeout: int = 600):
    """``accelerate launch`` for real: 2 CPU ranks over gloo (``ACCELERATE_USE_CPU`` + ``--multi_gpu``).

    ``args`` follow the launcher: ``["-m", "anemia_dist", "train", ...]`` or a script path.
    """
    command = launch_command(num_processes, args, port=free_port() if num_processes > 1 else None)
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )
    return result


def script(name: str) -> str:
    """A program in tests/scripts/ that the multi-process tests launch."""
    return str(ROOT / "tests" / "scripts" / name)


def run_cli(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python -m anemia_dist ARGS`` in a fresh process, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "anemia_dist", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        **kwargs,
    )


BAD = {
    "empty.png": "empty",
    "cut.png": "truncated",
    "cut.jpg": "truncated",
    "notes.jpg": "not_image",
    "tiny.png": "too_small",
}


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def add_bad_files(root: Path) -> None:
    """One file of each kind in :data:`BAD`, spread over the class folders of ``root``."""
    picture = Image.fromarray(np.random.default_rng(7).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    png, jpg = encoded(picture, "PNG"), encoded(picture, "JPEG")
    (root / "anemic" / "empty.png").write_bytes(b"")
    (root / "anemic" / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "non-anemic" / "cut.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    (root / "non-anemic" / "notes.jpg").write_text("haemoglobin 9.8 g/dL, left eye\n")
    Image.new("RGB", (8, 8), (200, 60, 60)).save(root / "anemic" / "tiny.png")


def make_best(directory: Path, classes: list[str], threshold: float = 0.5, temperature: float = 1.0) -> Path:
    """A best/ directory as training writes it (the trainer's own Checkpointer), with random weights."""
    assert directory.name == BEST
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, len(classes))
    point = OperatingPoint(classes[0], threshold, "fixed", temperature)
    Checkpointer(Accelerator(), directory.parent, cfg, classes).save_best(model, 1, 0.7, 0.5, point)
    return directory


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# `anemia-dist bench` as small and short as it goes.
TINY_BENCH = [
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--seconds",
    "0",
    "--steps",
    "1",
    "--e2e-steps",
    "1",
]


def phase_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    set_train_mode(model)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

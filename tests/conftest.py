"""Shared fixtures: tiny generated datasets and a real 2-rank CPU launcher."""

from __future__ import annotations

import csv
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anemia_dist.cli import launch_command

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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )
    return result


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})


@pytest.fixture
def cp_anemic() -> Path:
    if not CP_ANEMIC.is_dir():
        pytest.skip(f"real data not present at {CP_ANEMIC}")
    return CP_ANEMIC

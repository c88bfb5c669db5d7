"""Shared test helpers: tiny settings, generated images and manifests, bad files, and a real
2-rank CPU launcher. Imported as ``helpers`` (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from PIL import Image, ImageCms

from anemia_dist.checkpointing import Checkpointer
from anemia_dist.cli import launch_command
from anemia_dist.config import load_config
from anemia_dist.metrics import OperatingPoint
from anemia_dist.model import build_model, set_train_mode
from anemia_dist.run_dir import BEST, CHECKPOINT_INFO

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


ONE_PROCESS = "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
"""``accelerate launch`` arguments of one CPU process (a sweep trial's ``--launch-args``)."""


def write_sweep(path: Path, **spec) -> Path:
    """A sweep file (YAML) with these top-level keys."""
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_grid(path: Path, data: Path | str, output: Path | str, **parameters) -> Path:
    """A grid sweep file of one-epoch TINY trials on ``data``, run into ``output``."""
    overrides = [*TINY, f"data.root={data}", "train.epochs=1", f"run.output_dir={output}"]
    return write_sweep(path, method="grid", overrides=overrides, parameters=parameters)


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 24, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # A smooth random field under the noise: every picture differs in its coarse structure too, as
    # photos do, so the near-copy finder (which sees only coarse structure) keeps them apart.
    coarse = Image.fromarray(rng.normal(0, 60, (4, 4)).astype(np.float32), "F").resize((size, size), Image.BICUBIC)
    field = np.asarray(coarse)[:, :, None]
    noisy = np.array(rgb)[None, None, :] + field + rng.normal(0, 20, (size, size, 3))
    array = np.clip(noisy, 0, 255).astype(np.uint8)
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


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


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


def assert_same_numbers(a, b, rel: float = 1e-6, where: str = "") -> None:
    """Nested records equal, floats to ``rel``: the processes' batches differ, and float32 kernels
    may round a batch of 4 and a batch of 2 differently in the last bits."""
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=rel, abs=rel), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_numbers(a[key], b[key], rel, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_numbers(x, y, rel, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def fake_checkpoint(directory: Path, identity: dict, epoch: int, unfrozen: bool, step: int = 0, world: int = 2) -> Path:
    """A complete checkpoint as far as choosing one goes: its ``checkpoint.json``."""
    directory.mkdir(parents=True)
    progress = {"epoch": epoch, "step": step, "unfrozen": unfrozen}
    info = {"identity": identity, "progress": progress, "world_size": world}
    (directory / CHECKPOINT_INFO).write_text(json.dumps(info))
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


def _s15(value: float) -> bytes:
    return int(round(value * 65536)).to_bytes(4, "big", signed=True)


def display_p3_profile() -> bytes:
    """An ICC v2 matrix/TRC profile for Display P3 (P3 primaries, D65 white, the sRGB transfer
    curve), as phones embed in their photos; built here, so no profile file ships with the tests."""
    primaries, white = np.array([[0.680, 0.320], [0.265, 0.690], [0.150, 0.060]]), np.array([0.3127, 0.3290])

    def xyz(xy: np.ndarray) -> np.ndarray:
        return np.array([xy[0] / xy[1], 1.0, (1 - xy[0] - xy[1]) / xy[1]])

    columns = np.stack([xyz(p) for p in primaries], axis=1)
    rgb_to_xyz = columns * np.linalg.solve(columns, xyz(white))  # D65-relative
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    d50 = np.array([0.9642, 1.0, 0.8249])
    cone_ratio = np.diag((bradford @ d50) / (bradford @ xyz(white)))
    adapted = np.linalg.inv(bradford) @ cone_ratio @ bradford @ rgb_to_xyz  # colorants relative to D50, as ICC

    def xyz_tag(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in values)

    def text_tag(text: str) -> bytes:
        ascii_text = text.encode() + b"\0"
        return b"desc\0\0\0\0" + len(ascii_text).to_bytes(4, "big") + ascii_text + bytes(4 + 4 + 2 + 1 + 67)

    srgb_curve = b"para\0\0\0\0" + (3).to_bytes(2, "big") + bytes(2)
    srgb_curve += b"".join(_s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    tags = [
        (b"desc", text_tag("Display P3")),
        (b"wtpt", xyz_tag(d50)),
        (b"rXYZ", xyz_tag(adapted[:, 0])),
        (b"gXYZ", xyz_tag(adapted[:, 1])),
        (b"bXYZ", xyz_tag(adapted[:, 2])),
        (b"rTRC", srgb_curve),
        (b"gTRC", srgb_curve),
        (b"bTRC", srgb_curve),
    ]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + (offset + len(data)).to_bytes(4, "big") + len(body).to_bytes(4, "big")
        data += body
    size = offset + len(data)
    header = size.to_bytes(4, "big") + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
    header += bytes(24) + bytes(4) + b"".join(_s15(v) for v in d50)
    header += bytes(128 - len(header))
    return header + len(tags).to_bytes(4, "big") + table + data


def reddish_picture(seed: int = 0, size: int = 24) -> Image.Image:
    """Conjunctiva-like reds, pinks and a few saturated pixels: where P3 and sRGB encodings differ most."""
    rng = np.random.default_rng(seed)
    array = np.clip(np.array([190, 80, 80]) + rng.normal(0, 35, (size, size, 3)), 0, 255).astype(np.uint8)
    array[:2, :2] = (230, 20, 30)
    return Image.fromarray(array, "RGB")


def save_as_display_p3(picture: Image.Image, path, mode: str = "RGB", **options) -> None:
    """The same colours re-encoded in Display P3, with the profile embedded, as a phone saves them."""
    p3 = display_p3_profile()
    srgb = ImageCms.createProfile("sRGB")
    source = picture.convert(mode)
    encoded = ImageCms.profileToProfile(
        source, srgb, ImageCms.ImageCmsProfile(io.BytesIO(p3)), ImageCms.Intent.RELATIVE_COLORIMETRIC
    )
    encoded.save(path, icc_profile=p3, **options)

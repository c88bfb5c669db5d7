"""A synthetic conjunctiva-like dataset, so the whole pipeline runs with no download.

Each synthetic patient has a latent haemoglobin value; the colour of a crescent-shaped
"conjunctiva" goes from pale pink (low Hb) to deep red (high Hb), seen under varying lighting,
colour cast, pose and noise, several photos per patient. Label: anemic when Hb < 11 g/dL, which
makes about one anemic patient in three. Files are RGBA crops with the mask in alpha, like the
real CP-AnemiC images, and the pixels under alpha=0 hold random colour.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("anemic", "non-anemic")
MANIFEST = "manifest.csv"
HB_THRESHOLD = 11.0
PALE = np.array([236.0, 170.0, 165.0])
RED = np.array([172.0, 38.0, 48.0])


def _crescent_image(rng: np.random.Generator, hb: float, size: int) -> np.ndarray:
    t = float(np.clip((hb - 8.0) / (14.0 - 8.0), 0.0, 1.0))
    colour = PALE * (1 - t) + RED * t
    colour = colour * rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, size=3)  # lighting, colour cast

    angle = rng.uniform(-math.pi / 7, math.pi / 7)
    scale = rng.uniform(0.8, 1.1)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / (0.45 * size * scale)
    v = (-(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)) / (0.30 * size * scale)
    outer = u**2 + v**2 <= 1.0
    inner = u**2 + (v + 0.55) ** 2 <= 0.9
    mask = outer & ~inner & (v > -0.2)

    shade = 1.0 - 0.25 * np.clip(v, -1, 1)  # the fold is darker at its lower edge
    rgb = colour[None, None, :] * shade[..., None]
    rgb += rng.normal(0.0, 7.0, size=rgb.shape)
    rgb[~mask] = rng.uniform(0, 255, size=(int((~mask).sum()), 3))
    alpha = np.where(mask, 255, 0)
    return np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8)


def make_synthetic_dataset(
    out: Path, patients: int = 72, images_per_patient: int = 4, size: int = 80, seed: int = 0
) -> Path:
    """Write ``out/images/*.png`` and ``out/manifest.csv`` (path,label,group,hb); returns the CSV."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(patients):
        hb = float(rng.normal(11.6, 1.6))
        label = CLASSES[0] if hb < HB_THRESHOLD else CLASSES[1]
        for shot in range(images_per_patient):
            name = f"images/p{patient:03d}_{shot}.png"
            Image.fromarray(_crescent_image(rng, hb, size), mode="RGBA").save(out / name)
            rows.append({"path": name, "label": label, "group": f"patient{patient:03d}", "hb": f"{hb:.2f}"})
    manifest = out / MANIFEST
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest

"""Phone photos end to end: HEIC files with a Display P3 profile, EXIF camera and GPS, train and
predict in one process; nothing the package writes carries their EXIF or GPS."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, display_p3_profile
from PIL import Image

from anemia_dist.cli import main
from anemia_dist.images import IMAGE_EXTENSIONS

SECRET = "PatientName-Jane-Doe-GPS-5.6037N"
"""In each photo's EXIF ImageDescription, next to a GPS position: any copy of the EXIF shows it."""
CLASS_COLOURS = {"anemic": (215, 170, 165), "non-anemic": (190, 60, 60)}


def phone_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x010E] = "Apple", "iPhone 15", SECRET
    exif[0x8825] = {1: "N", 2: (5.0, 36.0, 13.0), 3: "W", 4: (0.0, 11.0, 12.0)}  # GPS IFD: Accra
    return exif


def write_phone_photos(root: Path, per_class: int = 6) -> Path:
    """HEIC (lossless, P3 profile, EXIF with GPS) and JPEG (EXIF with GPS) photos per class."""
    rng = np.random.default_rng(5)
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = np.clip(np.array(colour) + rng.normal(0, 12, (40, 48, 3)), 0, 255).astype(np.uint8)
            picture = Image.fromarray(array)
            if i % 2:
                picture.save(root / name / f"photo_{i}.jpg", exif=phone_exif(), quality=92)
            else:
                options = {"quality": -1, "chroma": 444, "icc_profile": display_p3_profile()}
                picture.save(root / name / f"photo_{i}.heic", exif=phone_exif(), **options)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny in-process training run on the phone photos (with a disk cache), then predict."""
    from anemia_dist import trainer
    from anemia_dist.config import load_config

    base = tmp_path_factory.mktemp("phones")
    data = write_phone_photos(base / "data")
    runs, cache = base / "runs", base / "cache"
    overrides = [f"data.root={data}", f"data.cache_dir={cache}", f"run.output_dir={runs}", "run.name=r"]
    trainer.train(
        load_config(None, [*TINY, *overrides, "train.epochs=1", "eval.bootstrap=100", "data.val_fraction=0.34"])
    )
    predictions = base / "predictions.csv"
    args = ["predict", "--checkpoint", str(runs / "r" / "best"), str(data), "--out", str(predictions)]
    assert main([*args, "--num-workers", "0"]) == 0
    return {"data": data, "run": runs / "r", "cache": cache, "predictions": predictions, "base": base}


def test_heic_photos_train_and_predict(trained):
    with (trained["run"] / "splits.csv").open() as handle:
        listed = [row["path"] for row in csv.DictReader(handle)]
    assert sum(path.endswith(".heic") for path in listed) == 6, "every HEIC photo is in the split"
    audit = json.loads((trained["run"] / "audit.json").read_text())
    assert audit["bad_files"] == 0 and audit["colour_profiles"] == {"Display P3": 6}
    assert audit["cameras"] == {"Apple iPhone 15": 12}
    with trained["predictions"].open() as handle:
        rows = list(csv.DictReader(handle))
    heic = [row for row in rows if row["path"].endswith(".heic")]
    assert len(rows) == 12 and len(heic) == 6
    assert all(not row["error"] and 0.0 <= float(row["probability"]) <= 1.0 for row in rows)


def written_files(trained: dict[str, Path]) -> list[Path]:
    outputs = [trained["run"], trained["cache"], trained["predictions"]]
    return [p for out in outputs for p in ([out] if out.is_file() else sorted(out.rglob("*"))) if p.is_file()]


def test_nothing_the_package_writes_carries_the_photos_exif_or_gps(trained):
    photo = next(trained["data"].rglob("*.jpg"))
    assert SECRET.encode() in photo.read_bytes() and Image.open(photo).getexif().get_ifd(0x8825), "negative control"
    files = written_files(trained)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    assert any(p.name == "report.html" for p in files) and images, "the run wrote its report and figures"
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and b"Exif\x00\x00" not in data, f"{path} carries the photos' EXIF"
    for path in images:
        with Image.open(path) as image:
            assert not image.getexif() and "exif" not in image.info, f"{path} has EXIF"

"""The quality gate of ``predict`` and ``evaluate``: files that are not usable photos are rejected
with their reason and never get a probability; every file given or found is a row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import make_best, make_image_folder, make_manifest, read_csv, write_image
from PIL import Image

from anemia_dist.cli import main
from anemia_dist.inference import evaluate, predict
from anemia_dist.quality import QUALITY, REJECTED, training_ranges
from anemia_dist.run_dir import BEST, META, PREDICTIONS


def add_training_ranges(best: Path, training_folder: Path) -> dict:
    """What training records in meta.json, measured on ``training_folder``'s images."""
    meta = json.loads((best / META).read_text())
    paths = sorted(training_folder.rglob("*.png"))
    meta[QUALITY] = training_ranges(paths, meta["alpha_background"], 16)
    (best / META).write_text(json.dumps(meta))
    return meta[QUALITY]


def noise(width: int, height: int, level: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(rng.normal(level, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def unusable_folder(folder: Path) -> dict[str, str]:
    """One file of each kind the gate or the reader must refuse, with a word its reason holds."""
    folder.mkdir(parents=True)
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint16)).save(folder / "blank16.png")
    assert Image.open(folder / "blank16.png").mode.startswith("I")
    noise(20000, 10, 128).save(folder / "strip.png")
    noise(600, 40, 128).save(folder / "narrow.png")  # big enough, but 15:1
    noise(64, 64, 5).save(folder / "dark.png")
    clear = np.zeros((64, 64, 4), dtype=np.uint8)
    clear[0, 0] = (200, 60, 60, 255)
    Image.fromarray(clear, "RGBA").save(folder / "clear.png")
    noise(32, 32, 128).save(folder / "animated.gif")
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    return {
        "dot.png": "data.min_size=16",
        "blank16.png": "nearly uniform",
        "strip.png": "smaller than data.min_size",
        "narrow.png": "aspect ratio",
        "dark.png": "far darker",
        "clear.png": "nearly all transparent",
        "animated.gif": "unsupported format .gif",
        "gone.png": "broken symbolic link",
    }


def test_predict_rejects_each_kind_of_unusable_file_and_scores_the_photos(tmp_path, capsys):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"], threshold=0.5)
    ranges = add_training_ranges(best, make_image_folder(tmp_path / "train", {"anemic": 4, "non-anemic": 4}))
    assert ranges["images"] == 8 and ranges["max_elongation"] == 1.0
    photos = make_image_folder(tmp_path / "inputs", {"a": 2, "b": 2})  # negative control: scored
    expected = unusable_folder(photos / "bad")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(best), str(photos), "--out", str(out), "--num-workers", "0"]) == 0
    rows = {str(Path(r["path"]).relative_to(photos)): r for r in read_csv(out)}
    assert len(rows) == 4 + len(expected)
    for name, why in expected.items():
        row = rows[f"bad/{name}"]
        assert row["probability"] == "", name
        assert why in row["reason"] + row["error"], (name, row)
        assert (row["prediction"] == REJECTED) == bool(row["reason"]), name
    for name in ("a/img_000.png", "a/img_001.png", "b/img_000.png", "b/img_001.png"):
        assert 0.0 <= float(rows[name]["probability"]) <= 1.0 and not rows[name]["reason"] + rows[name]["error"]
    err = capsys.readouterr().err
    assert "4 image(s) scored, 6 rejected by the quality gate, 2 unreadable" in err


def test_no_quality_gate_scores_what_the_gate_would_reject(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    (gated,) = predict(best, [tmp_path / "dot.png"], num_workers=0)
    assert gated["prediction"] == REJECTED and gated["probability"] == ""
    out = tmp_path / "ungated.csv"
    args = ["predict", "--checkpoint", str(best), str(tmp_path / "dot.png"), "--out", str(out), "--num-workers", "0"]
    assert main([*args, "--no-quality-gate"]) == 0
    (ungated,) = read_csv(out)
    assert ungated["probability"] != "" and not ungated["reason"] and ungated["prediction"] != REJECTED


def test_a_missing_input_path_is_a_row_with_its_error(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    write_image(tmp_path / "ok.png", (200, 60, 60))
    rows = predict(best, [tmp_path / "ok.png", tmp_path / "typo.png"], num_workers=0)
    assert [r["error"] for r in rows] == ["", "no such file or folder"] and rows[0]["probability"]


def test_evaluate_leaves_rejected_files_out_of_the_metrics_and_lists_them(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    manifest = make_manifest(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    Image.new("RGB", (1, 1)).save(tmp_path / "data" / "anemic" / "dot.png")
    with manifest.open("a") as handle:
        handle.write("anemic/dot.png,anemic,anemic-p9\n")
    record = evaluate(best, manifest, ["data.num_workers=0", "eval.bootstrap=100"], report_dir=tmp_path / "rep")
    assert record["n"] == 8 and [Path(r["path"]).name for r in record["rejected"]] == ["dot.png"]
    listed = read_csv(tmp_path / "rep" / PREDICTIONS)
    (dot,) = [r for r in listed if r["path"].endswith("dot.png")]
    assert dot["prediction"] == REJECTED and dot["probability"] == "" and "min_size" in dot["reason"]
    assert len(listed) == 9 and all(r["probability"] for r in listed if r is not dot)
    ungated = evaluate(
        best, manifest, ["data.num_workers=0", "eval.bootstrap=100"], report_dir=tmp_path / "r2", quality_gate=False
    )
    assert ungated["n"] == 9 and ungated["rejected"] == []

"""``anemia-dist export``: the portable file computes what ``anemia-dist predict`` computes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import CP_ANEMIC, ROOT, make_best, make_image_folder, reddish_picture, save_as_display_p3, write_csv
from PIL import Image
from sklearn.metrics import roc_auc_score

from anemia_dist import __version__
from anemia_dist.cli import main
from anemia_dist.errors import ConfigError, DataError
from anemia_dist.export import ExportError, export, labelled_samples, portable_model, self_check
from anemia_dist.images import load_rgb
from anemia_dist.inference import predict
from anemia_dist.run_dir import META, WEIGHTS

TOLERANCE = 1e-4


def readme_lines() -> str:
    """The code block of the README's export section: what a user copies."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Export: a portable model") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def photos(folder: Path) -> list[Path]:
    """JPEG (large enough for a reduced DCT scale, one EXIF-rotated, one Display P3), PNG, RGBA
    PNG, one smaller than the training size; plus every 15th CP-AnemiC crop where present."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    made = []
    for i in range(8):
        height, width = (int(v) for v in rng.integers(70, 220, 2))
        coarse = rng.integers(30, 226, (5, 7, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        picture.save(folder / f"photo_{i}.jpg", quality=90)
        picture.save(folder / f"photo_{i}.png")
        rgba = picture.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        rgba.save(folder / f"crop_{i}.png")
        made += [folder / f"photo_{i}.jpg", folder / f"photo_{i}.png", folder / f"crop_{i}.png"]
    rotated = reddish_picture(5, size=90)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    save_as_display_p3(reddish_picture(6, size=120), folder / "p3.jpg", quality=92)
    reddish_picture(7, size=20).save(folder / "small.png")
    made += [folder / "rotated.jpg", folder / "p3.jpg", folder / "small.png"]
    if CP_ANEMIC.is_dir():
        made += sorted(CP_ANEMIC.glob("*/*.png"))[::15]
    return made


def predicted(best: Path, files: list[Path]) -> dict[str, tuple[float, str]]:
    rows = predict(best, files, batch_size=16, num_workers=0)
    assert not any(row["error"] for row in rows)
    return {row["path"]: (float(row["probability"]), row["prediction"]) for row in rows}


def split_threshold(probabilities) -> float:
    """Halfway across the widest gap in the middle half of the scores: both decisions occur, and
    no score lies near the threshold."""
    ordered = np.sort(np.asarray(list(probabilities)))
    middle = ordered[len(ordered) // 4 : 3 * len(ordered) // 4 + 1]
    gap = int(np.argmax(np.diff(middle)))
    return float((middle[gap] + middle[gap + 1]) / 2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A random-init model whose threshold splits the test photos, exported to ONNX with --quantize."""
    base = tmp_path_factory.mktemp("export")
    best = make_best(base / "run" / "best", ["anemic", "non-anemic"], temperature=1.7)
    files = photos(base / "photos")
    meta = json.loads((best / META).read_text())
    meta["threshold"] = split_threshold(p for p, _ in predicted(best, files).values())
    (best / META).write_text(json.dumps(meta))
    labelled = make_image_folder(base / "labelled", {"anemic": 8, "non-anemic": 8})
    rows = [{"path": str(p), "label": p.parent.name, "split": "val"} for p in sorted(labelled.rglob("*.png"))]
    rows += [{"path": str(p), "label": "anemic", "split": "train"} for p in files[:3]]
    write_csv(best.parent / "splits.csv", rows)  # as training writes it: the validation rows are the labelled set
    out = base / "model.onnx"
    assert main(["export", "--checkpoint", str(best), "--format", "onnx", "--out", str(out), "--quantize"]) == 0
    return {"best": best, "files": files, "onnx": out, "labelled": labelled, "base": base, "meta": meta}


def run_lines(code: str, model: Path, files: list[Path]) -> dict[str, tuple[float, str]]:
    script = model.with_name("score.py")
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script), str(model), *map(str, files)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {path: (float(p), decision) for path, p, decision in (line.split() for line in result.stdout.splitlines())}


def test_the_readme_lines_with_onnxruntime_and_pillow_give_predicts_probabilities(exported):
    files, expected = exported["files"], predicted(exported["best"], exported["files"])
    got = run_lines(readme_lines(), exported["onnx"], files)
    assert set(got) == set(expected)
    difference = max(abs(got[path][0] - expected[path][0]) for path in expected)
    assert difference <= TOLERANCE, f"max |dp| {difference:.2e} over {len(files)} images"
    assert all(got[path][1] == expected[path][1] for path in expected), "the same decisions"
    assert {decision for _, decision in expected.values()} == {"anemic", "non-anemic"}, "both decisions occur"

    without_draft = "\n".join(line for line in readme_lines().splitlines() if ".draft(" not in line)
    jpegs = [f for f in files if f.suffix == ".jpg"]
    undrafted = run_lines(without_draft, exported["onnx"], jpegs)
    worst = max(abs(undrafted[str(f)][0] - expected[str(f)][0]) for f in jpegs)
    assert worst > TOLERANCE, "negative control: a JPEG decoded at full scale is another picture for the model"


def test_the_graph_takes_any_size_and_its_own_resize_stays_close_to_pillows(exported):
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    image_input = session.get_inputs()[0]
    assert image_input.name == "image" and image_input.type == "tensor(uint8)"
    assert image_input.shape == ["batch", "height", "width", 3]
    files, expected = exported["files"], predicted(exported["best"], exported["files"])
    background = tuple(exported["meta"]["alpha_background"])
    decoded = [np.asarray(load_rgb(f, background, min_side=32))[None] for f in files]  # predict's decode, no resize
    assert len({array.shape for array in decoded}) > 5, "many sizes, no Pillow resize"
    scores = [float(session.run(None, {"image": array})[0][0]) for array in decoded]
    worst = max(abs(score - expected[str(f)][0]) for f, score in zip(files, scores, strict=True))
    assert worst < 1e-3, f"the graph's resize moved P by {worst:.2e}"
    batch = np.concatenate([decoded[0], decoded[0][:, ::-1]])
    assert session.run(None, {"image": np.ascontiguousarray(batch)})[0].shape == (2,)


def test_the_onnx_file_carries_what_a_user_needs_to_decide(exported):
    found = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    meta = exported["meta"]
    assert json.loads(found["classes"]) == meta["classes"] and found["positive_class"] == "anemic"
    assert found["negative_class"] == "non-anemic" and float(found["threshold"]) == meta["threshold"]
    assert found["threshold_rule"] == "fixed" and float(found["temperature"]) == 1.7
    assert int(found["image_size"]) == 32 and json.loads(found["background"]) == meta["alpha_background"]
    assert found["anemia_dist_version"] == __version__ and found["task"] == "classification"


def test_torchscript_file_matches_predict_and_carries_the_metadata(exported, tmp_path):
    out = tmp_path / "model.pt"
    result = export(exported["best"], "torchscript", out)
    assert result["self_check_max_abs_diff"] <= TOLERANCE
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    metadata = json.loads(extra["meta.json"])
    assert float(metadata["threshold"]) == exported["meta"]["threshold"] and metadata["positive_class"] == "anemic"
    files, expected = exported["files"], predicted(exported["best"], exported["files"])
    from anemia_dist.datasets import decode

    pixels = torch.stack([decode(f, 32, exported["meta"]["alpha_background"]).permute(1, 2, 0) for f in files])
    with torch.no_grad():
        scores = loaded(pixels).double().numpy()
    assert np.abs(scores - np.array([expected[str(f)][0] for f in files])).max() <= TOLERANCE


def test_quantized_copy_records_the_auroc_and_decisions_it_keeps(exported):
    int8 = exported["onnx"].with_name("model.int8.onnx")
    record = json.loads(int8.with_suffix(".json").read_text())
    assert record["data"].endswith("splits.csv (split val)") and record["n"] == 16 and record["n_positive"] == 8
    assert record["operators_int8"]["ConvInteger"] == 20 and record["operators_int8"]["Conv"] == 0
    assert record["bytes_int8"] == int8.stat().st_size < record["bytes_fp32"] / 3
    expected = predicted(exported["best"], sorted(exported["labelled"].rglob("*.png")))
    truth = [Path(path).parent.name == "anemic" for path in expected]
    assert record["auroc_fp32"] == pytest.approx(roc_auc_score(truth, [p for p, _ in expected.values()]), abs=1e-4)
    assert 0 <= record["auroc_int8"] <= 1 and 0 <= record["decisions_equal"] <= 16
    assert 0 < record["max_abs_diff"] < 0.5 and record["mean_abs_diff"] <= record["max_abs_diff"]
    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["positive_class"] == "anemic", "metadata kept"


def test_quantize_data_takes_class_folders_or_a_labelled_csv(exported):
    classes = exported["meta"]["classes"]
    from_folder, source = labelled_samples(exported["best"], exported["labelled"], classes)
    assert source == str(exported["labelled"]) and len(from_folder) == 16
    from_csv, _ = labelled_samples(exported["best"], exported["best"].parent / "splits.csv", classes)
    assert len(from_csv) == 19, "a CSV given with --data is used whole"
    default, _ = labelled_samples(exported["best"], None, classes)
    assert {(s.path, s.label) for s in default} == {(s.path, s.label) for s in from_folder}
    with pytest.raises(DataError, match="--data must be an image folder"):
        labelled_samples(exported["best"], exported["base"] / "absent", classes)


def test_a_file_that_computes_something_else_fails_the_self_check(exported):
    model, _ = portable_model(exported["best"])
    model.readout.temperature = 1.0  # the file was exported with 1.7
    with pytest.raises(ExportError, match="differs from the checkpoint"):
        self_check(model, exported["onnx"], "onnx")


def copy_best(source: Path, target: Path, **meta_changes) -> Path:
    target.mkdir(parents=True)
    (target / WEIGHTS).write_bytes((source / WEIGHTS).read_bytes())
    meta = json.loads((source / META).read_text())
    (target / META).write_text(json.dumps({**meta, **meta_changes}))
    return target


def test_export_refuses_what_it_cannot_do(exported, tmp_path, capsys):
    best = exported["best"]
    args = ["export", "--checkpoint", str(best), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    assert main([*args, "--quantize"]) == 2
    assert "--quantize: int8 quantisation is for --format onnx" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(best), "--format", "tflite", "--out", str(tmp_path / "m")]) == 2
    assert "--format 'tflite': choose one of onnx, torchscript" in capsys.readouterr().err
    with pytest.raises(DataError, match="splits.csv beside the checkpoint"):
        export(copy_best(best, tmp_path / "copied" / "best"), "onnx", tmp_path / "m.onnx", quantized=True)
    regression = copy_best(best, tmp_path / "hb" / "best", task="regression")
    with pytest.raises(ConfigError, match="task 'regression'.*classification checkpoints only"):
        export(regression, "onnx", tmp_path / "hb.onnx")
    assert not (tmp_path / "hb.onnx").exists() and not list(tmp_path.glob("m*")), "nothing written"

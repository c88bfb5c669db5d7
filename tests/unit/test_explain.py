"""Grad-CAM overlays: ``predict --explain`` writes one per scored photo at its own size without
EXIF, and the maps agree with pytorch-grad-cam's. (Where the maps land on a trained model:
``tests/multiprocess/test_explain_training.py``.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_best, make_manifest, read_csv, write_image
from PIL import Image

from anemia_dist.cli import main
from anemia_dist.config import ModelConfig
from anemia_dist.errors import ConfigError
from anemia_dist.explain import confident_errors, grad_cam, heat_at, overlay_names
from anemia_dist.inference import evaluate
from anemia_dist.model import build_model
from anemia_dist.run_dir import BEST, PREDICTIONS, REPORT_PAGE


def test_predict_explain_writes_an_overlay_per_scored_photo_at_its_size_without_exif(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    photos = tmp_path / "photos"
    write_image(photos / "a" / "eye.png", (200, 60, 60), size=40)
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0112] = 6  # Orientation: rotated, so the photo as seen is 30 wide and 50 high
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    (photos / "b").mkdir()
    picture.save(photos / "b" / "eye.jpg", exif=exif)
    Image.new("RGB", (1, 1)).save(photos / "dot.png")  # rejected: no overlay
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    args = ["predict", "--checkpoint", str(best), str(photos), "--out", str(out), "--num-workers", "0"]
    assert main([*args, "--explain", str(maps)]) == 0
    rows = {r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1]: r for r in read_csv(out)}
    assert rows["photos/dot.png"]["heatmap"] == ""
    sizes = {"a/eye.png": (40, 40), "b/eye.jpg": (30, 50)}
    written = set()
    for name, size in sizes.items():
        heatmap = rows[name]["heatmap"]
        with Image.open(heatmap) as image:
            assert image.format == "PNG" and image.size == size and image.mode == "RGB"
            assert not image.getexif() and "exif" not in image.info
        written.add(heatmap)
    assert len(written) == 2 and sorted(p.name for p in maps.iterdir()) == ["eye-2.png", "eye.png"]


def test_overlay_names_stay_unique():
    assert overlay_names(["x/a.jpg", "y/a.png", "a-2.png", "z/a.heic"]) == ["a.png", "a-2.png", "a-2-2.png", "a-3.png"]


def test_heat_puts_each_cell_over_the_pixels_it_is_centred_on():
    """ResNet cell i is centred on input pixel 32·i: a one-hot cell peaks there, not half a cell later."""
    cam = np.zeros((4, 4))
    cam[1, 2] = 1.0
    heat = heat_at(cam, (128, 128))
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(y - 32) <= 1 and abs(x - 64) <= 1
    assert heat[:, 0].max() == 0.0 and heat.max() <= 1.0


def test_grad_cam_cell_maps_agree_with_pytorch_grad_cam():
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", weights="none", hidden=16, dropout=0.0), 2).eval()
    inputs = torch.randn(3, 3, 128, 128)
    called = torch.tensor([True, False, True])
    ours = grad_cam(model, inputs, 1, called)
    assert ours.shape == (3, 4, 4) and float(ours.amin()) == 0.0 and float(ours.amax()) == pytest.approx(1.0, abs=1e-5)

    def log_odds(decided_positive):
        return lambda output: (output[1] - output[0]) * (1 if decided_positive else -1)

    targets = [log_odds(bool(c)) for c in called]
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.layer4]) as cam:
        cam(input_tensor=inputs, targets=targets)  # records layer4's activations and gradients
        recorded = cam.activations_and_grads
        activations, gradients = (t[0].cpu().numpy() for t in (recorded.activations, recorded.gradients))
        cells = cam.get_cam_image(inputs, model.layer4, targets, activations, gradients)
    # the library's own steps before its OpenCV resize: ReLU, then min-max per image
    theirs = scale_cam_image(np.maximum(cells, 0))
    assert np.abs(ours.numpy() - theirs).max() < 1e-5


def test_confident_errors_are_the_most_confident_misses_and_alarms_first():
    truth = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    score = np.array([0.1, 0.4, 0.9, 0.8, 0.2, 0.95, 0.05, 0.6])
    assert confident_errors(truth, score, 0.5, 8) == ([6, 0, 1], [5, 3, 7])
    assert confident_errors(truth, score, 0.5, 2) == ([6, 0], [5, 3])
    assert confident_errors(truth, score, 0.0, 8) == ([], [5, 3, 7, 4])


@pytest.mark.parametrize("threshold, shown", [(0.0, "fp"), (1.0, "fn")])
def test_evaluation_report_shows_the_most_confident_errors_with_overlays(tmp_path, threshold, shown):
    """Threshold 0 calls every image positive (all negatives are false positives), 1 none."""
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"], threshold=threshold)
    manifest = make_manifest(tmp_path / "data", {"anemic": 10, "non-anemic": 10})
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    with Image.open(tmp_path / "data" / "anemic" / "img_000.png") as photo:
        photo.load()
    photo.save(tmp_path / "data" / "anemic" / "img_000.png", exif=exif)  # same pixels, now with EXIF
    for name in ("anemic", "non-anemic"):
        with Image.open(tmp_path / "data" / name / "img_001.png") as photo:
            assert photo.size == (24, 24)
    report = tmp_path / "report"
    record = evaluate(best, manifest, ["data.num_workers=0", "eval.bootstrap=100"], report_dir=report)
    predictions = {r["path"]: float(r["probability"]) for r in read_csv(report / PREDICTIONS)}
    overlays = sorted((report / "errors").glob("*.png"))
    assert [p.name for p in overlays] == [f"{shown}-{k:02d}.png" for k in range(1, 9)]  # 10 errors, 8 shown
    for overlay_file in overlays:
        with Image.open(overlay_file) as image:
            assert image.size == (24, 24) and not image.getexif() and "exif" not in image.info
    page = (report / REPORT_PAGE).read_text()
    assert "Most confident false negatives" in page and "Most confident false positives" in page
    assert page.count('class="case"') == 8 and "None." in page
    wrong = "anemic" if shown == "fn" else "non-anemic"
    expected = sorted(
        (p for p in predictions if f"/{wrong}/" in p), key=lambda p: predictions[p], reverse=shown == "fp"
    )[:8]
    captions = [f"{Path(p).name}: P(anemic) = {predictions[p]:.3f}" for p in expected]
    positions = [page.index(caption) for caption in captions]
    assert positions == sorted(positions) and record["n"] == 20


def test_grad_cam_uses_a_timm_backbones_last_stage_and_refuses_tokens():
    torch.manual_seed(0)
    convnet = build_model(ModelConfig(arch="timm:convnext_atto", weights="none", hidden=16, dropout=0.0), 2).eval()
    cams = grad_cam(convnet, torch.randn(2, 3, 64, 64), 0, torch.tensor([True, False]))
    assert cams.shape == (2, 2, 2) and float(cams.amax()) == pytest.approx(1.0, abs=1e-5)
    vit = build_model(ModelConfig(arch="timm:vit_tiny_patch16_224", weights="none", hidden=16, dropout=0.0), 2, 32)
    with pytest.raises(ConfigError, match="spatial map"):
        grad_cam(vit.eval(), torch.randn(1, 3, 32, 32), 0, torch.tensor([True]))
